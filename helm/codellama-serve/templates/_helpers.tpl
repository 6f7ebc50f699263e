{{/* Names and labels. */}}
{{- define "codellama-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codellama-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "codellama-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "codellama-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "codellama-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "codellama-serve.labels" -}}
helm.sh/chart: {{ include "codellama-serve.chart" . }}
{{ include "codellama-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: codellama-serve
{{- end }}

{{/* The pods that run engines: Ray GPU workers, or the Deployment's pods. */}}
{{- define "codellama-serve.engineComponent" -}}
{{- if eq .Values.mode "rayservice" }}worker{{ else }}engine{{ end }}
{{- end }}

{{- define "codellama-serve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion (ternary "cuda" "cpu" .Values.gpu.enabled)) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
The server settings every replica gets: the `args.settings` of the Ray app in
serveConfigV2, and the settings file of the Deployment's pods. Free-form
`.Values.settings`, plus the keys the chart's own values set (the list is
tools/gen_values_schema.py's CHART_OWNED). Empty sections are left out, as
engine.ray_config.settings_args does.
*/}}
{{- define "codellama-serve.settings" -}}
{{- $v := .Values }}
{{- $s := deepCopy ($v.settings | default dict) }}
{{- $engine := get $s "engine" | default dict }}
{{- $_ := set $engine "model" $v.model }}
{{- $_ := set $engine "tensor_parallel_size" (int $v.tensorParallelSize) }}
{{- $_ := set $s "engine" $engine }}
{{- $server := get $s "server" | default dict }}
{{- $_ := set $server "drain_timeout_s" $v.drain.timeoutSeconds }}
{{- $_ := set $s "server" $server }}
{{- $ray := get $s "ray" | default dict }}
{{- $_ := set $ray "accelerator_type" ($v.gpu.acceleratorType | default nil) }}
{{- if not $v.gpu.enabled }}
{{- $_ := set $ray "ray_use_gpu" false }}
{{- end }}
{{- $_ := set $ray "min_replicas" (int $v.autoscaling.minReplicas) }}
{{- $_ := set $ray "max_replicas" (int $v.autoscaling.maxReplicas) }}
{{- $_ := set $ray "upscale_delay_s" $v.autoscaling.upscaleDelaySeconds }}
{{- $_ := set $ray "downscale_delay_s" $v.autoscaling.downscaleDelaySeconds }}
{{- $_ := set $s "ray" $ray }}
{{- $routing := get $s "routing" | default dict }}
{{- $_ := set $routing "ray_ingress" $v.rayService.ingress }}
{{- $_ := set $s "routing" $routing }}
{{- if $v.lora.enabled }}
{{- $lora := get $s "lora" | default dict }}
{{- $_ := set $lora "enable_lora" true }}
{{- $modules := list }}
{{- range $v.lora.adapters }}
{{- $modules = append $modules (dict "name" .name "path" (include "codellama-serve.adapterPath" (list $v .path))) }}
{{- end }}
{{- if $modules }}
{{- $_ := set $lora "lora_modules" $modules }}
{{- end }}
{{- $_ := set $s "lora" $lora }}
{{- end }}
{{- if $v.apiKeys.existingSecret }}
{{- $auth := get $s "auth" | default dict }}
{{- $_ := set $auth "api_keys_file" (include "codellama-serve.apiKeysFile" .) }}
{{- $_ := set $s "auth" $auth }}
{{- end }}
{{- range $section, $values := deepCopy $s }}
{{- if empty $values }}
{{- $_ := unset $s $section }}
{{- end }}
{{- end }}
{{- toYaml $s }}
{{- end }}

{{/* An adapter's path as the replicas see it: relative paths lie on the model volume. */}}
{{- define "codellama-serve.adapterPath" -}}
{{- $v := index . 0 }}
{{- $path := index . 1 }}
{{- if or (hasPrefix "/" $path) (eq $path "demo") }}{{ $path }}{{ else }}{{ printf "%s/%s" (trimSuffix "/" $v.modelCache.mountPath) $path }}{{ end }}
{{- end }}

{{- define "codellama-serve.apiKeysDir" -}}/etc/codellama-serve/api-keys{{- end }}
{{- define "codellama-serve.apiKeysFile" -}}
{{- printf "%s/%s" (include "codellama-serve.apiKeysDir" .) .Values.apiKeys.key }}
{{- end }}

{{/* Ray-section settings the Kubernetes objects follow, with engine/config.py's defaults. */}}
{{- define "codellama-serve.rayHttpPort" -}}
{{- $s := include "codellama-serve.settings" . | fromYaml }}
{{- dig "ray" "ray_http_port" 8000 $s | int }}
{{- end }}
{{- define "codellama-serve.rayMetricsPort" -}}
{{- $s := include "codellama-serve.settings" . | fromYaml }}
{{- dig "ray" "ray_metrics_port" 9400 $s | int }}
{{- end }}

{{/*
The Ray Serve config (KubeRay serveConfigV2): the structure engine.ray_config.serve_config
builds and deploy/ray/serve-config.yaml holds.
*/}}
{{- define "codellama-serve.serveConfig" -}}
{{- $s := include "codellama-serve.settings" . | fromYaml }}
{{- $ray := get $s "ray" | default dict }}
{{- $app := dict
  "name" (dig "ray_app_name" "codellama" $ray)
  "route_prefix" (dig "ray_route_prefix" "/" $ray)
  "import_path" "engine.ray_serve:build_app"
  "args" (dict "settings" $s) }}
{{- $config := dict
  "proxy_location" "EveryNode"
  "http_options" (dict "host" (dig "ray_http_host" "0.0.0.0" $ray) "port" (dig "ray_http_port" 8000 $ray | int))
  "applications" (list $app) }}
{{- toYaml $config }}
{{- end }}

{{/* terminationGracePeriodSeconds: preStop sleep + drain timeout + margin. */}}
{{- define "codellama-serve.gracePeriod" -}}
{{- add .Values.drain.preStopSleepSeconds .Values.drain.timeoutSeconds .Values.drain.marginSeconds }}
{{- end }}

{{/* Resources of an engine pod: cpu/memory per GPU (or worker.resources), GPUs = TP size. */}}
{{- define "codellama-serve.engineResources" -}}
{{- $tp := int .Values.tensorParallelSize }}
{{- $r := dict }}
{{- if .Values.worker.resources }}
{{- $r = deepCopy .Values.worker.resources }}
{{- else }}
{{- $cpu := mulf .Values.worker.cpuPerGpu $tp }}
{{- $mem := printf "%sGi" (toString (mulf .Values.worker.memoryGiPerGpu $tp)) }}
{{- $q := dict "cpu" (toString $cpu) "memory" $mem }}
{{- $r = dict "requests" (deepCopy $q) "limits" (deepCopy $q) }}
{{- end }}
{{- if .Values.gpu.enabled }}
{{- $limits := get $r "limits" | default dict }}
{{- $_ := set $limits .Values.gpu.resourceName $tp }}
{{- $_ := set $r "limits" $limits }}
{{- $requests := get $r "requests" | default dict }}
{{- $_ := set $requests .Values.gpu.resourceName $tp }}
{{- $_ := set $r "requests" $requests }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/* Scheduling of engine pods: GPU nodes when gpu.enabled. */}}
{{- define "codellama-serve.engineScheduling" -}}
{{- if .Values.gpu.enabled }}
{{- with .Values.gpu.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .Values.gpu.affinity }}
affinity:
  {{- toYaml .Values.gpu.affinity | nindent 2 }}
{{- else if .Values.gpu.products }}
affinity:
  nodeAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      nodeSelectorTerms:
        - matchExpressions:
            - key: {{ .Values.gpu.productLabel }}
              operator: In
              values:
                {{- toYaml .Values.gpu.products | nindent 16 }}
{{- end }}
{{- with .Values.gpu.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}

{{/* Environment of every engine container (and the Ray head). */}}
{{- define "codellama-serve.env" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.modelCache.mountPath | quote }}
- name: CODELLAMA_SERVE_CACHE_DIR
  value: {{ printf "%s/codellama-serve" .Values.modelCache.mountPath | quote }}
{{- if .Values.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.hfToken.existingSecret }}
      key: {{ .Values.hfToken.key }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
What every Ray pod's environment needs for the ingress (Ray reads it when its processes
start): engine.ray_config.ingress_env of the same settings.
*/}}
{{- define "codellama-serve.rayIngressEnv" -}}
{{- $s := include "codellama-serve.settings" . | fromYaml }}
{{- if eq .Values.rayService.ingress "haproxy" }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: "1"
{{- if has (dig "routing" "ray_router" "codellama" $s) (list "codellama" "ray_prefix") }}
- name: RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY
  value: "1"
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes every engine pod mounts: the model cache, /dev/shm, the API keys. */}}
{{- define "codellama-serve.volumes" -}}
- name: model-cache
{{- if eq .Values.modelCache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelCache.pvc.existingClaim | default (printf "%s-model-cache" (include "codellama-serve.fullname" .)) }}
{{- else if eq .Values.modelCache.type "hostPath" }}
  hostPath:
    path: {{ .Values.modelCache.hostPath.path }}
    {{- with .Values.modelCache.hostPath.type }}
    type: {{ . }}
    {{- end }}
{{- else }}
  emptyDir:
    {{- with .Values.modelCache.emptyDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- else }} {}
    {{- end }}
{{- end }}
- name: dshm
  emptyDir:
    medium: Memory
    {{- with .Values.worker.shmSize }}
    sizeLimit: {{ . }}
    {{- end }}
{{- include "codellama-serve.apiKeysVolume" . }}
{{- end }}

{{- define "codellama-serve.volumeMounts" -}}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
- name: dshm
  mountPath: /dev/shm
{{- include "codellama-serve.apiKeysVolumeMount" . }}
{{- end }}

{{- define "codellama-serve.apiKeysVolume" -}}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.apiKeys.existingSecret }}
    items:
      - key: {{ .Values.apiKeys.key }}
        path: {{ .Values.apiKeys.key }}
{{- end }}
{{- end }}

{{- define "codellama-serve.apiKeysVolumeMount" -}}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  mountPath: {{ include "codellama-serve.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Monitoring objects: on when asked, or "auto" and the Prometheus operator is there. */}}
{{- define "codellama-serve.monitoringEnabled" -}}
{{- $enabled := toString .enabled }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "codellama-serve.validate" -}}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) > autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and (eq .Values.mode "deployment") (lt (int .Values.autoscaling.minReplicas) 1) }}
{{- fail "mode=deployment cannot scale to zero: set autoscaling.minReplicas >= 1 (scale to zero needs mode=rayservice)" }}
{{- end }}
{{- $ray := (include "codellama-serve.settings" . | fromYaml).ray | default dict }}
{{- if hasKey $ray "initial_replicas" }}
{{- $initial := int $ray.initial_replicas }}
{{- if or (lt $initial (int .Values.autoscaling.minReplicas)) (gt $initial (int .Values.autoscaling.maxReplicas)) }}
{{- fail (printf "settings.ray.initial_replicas (%d) must lie in [autoscaling.minReplicas, autoscaling.maxReplicas]" $initial) }}
{{- end }}
{{- end }}
{{- if and (not .Values.gpu.enabled) (eq .Values.mode "rayservice") (gt (int .Values.tensorParallelSize) 1) }}
{{- fail "tensorParallelSize > 1 needs gpu.enabled" }}
{{- end }}
{{- include "codellama-serve.validateLora" . }}
{{- end }}

{{/* LoRA values the server would refuse at start, refused at install time instead. */}}
{{- define "codellama-serve.validateLora" -}}
{{- $l := .Values.lora }}
{{- $settings := (.Values.settings | default dict).lora | default dict }}
{{- if and $l.adapters (not $l.enabled) }}
{{- fail "lora.adapters needs lora.enabled=true" }}
{{- end }}
{{- if and $settings.allow_runtime_lora_updating (not $l.enabled) }}
{{- fail "settings.lora.allow_runtime_lora_updating needs lora.enabled=true" }}
{{- end }}
{{- if and $settings.allow_runtime_lora_updating (eq .Values.mode "rayservice") }}
{{- fail "settings.lora.allow_runtime_lora_updating works in mode=deployment only: in Ray Serve a load would reach one replica; list the adapters in lora.adapters" }}
{{- end }}
{{- $names := list }}
{{- range $l.adapters }}
{{- $names = append $names .name }}
{{- if and (eq $.Values.modelCache.type "emptyDir") (not (hasPrefix "/" .path)) (ne .path "demo") }}
{{- fail (printf "lora.adapters %s: a path on the model volume needs modelCache.type pvc or hostPath (an emptyDir starts empty)" .name) }}
{{- end }}
{{- end }}
{{- if ne (len $names) (len (uniq $names)) }}
{{- fail "lora.adapters: adapter names must be unique" }}
{{- end }}
{{- end }}
