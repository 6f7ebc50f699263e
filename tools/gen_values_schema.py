"""Keep the chart's `settings` schema equal to the server's settings (engine/config.py).

`helm/codellama-serve/values.schema.json` is written by hand except for
`properties.settings`, which this script generates from the pydantic models, so
`helm install` rejects an unknown setting or a wrong type before any pod starts.
The keys the chart sets from its own values (CHART_OWNED) are left out: setting
them under `settings` fails schema validation, and API keys never go into values.

    python tools/gen_values_schema.py           # rewrite the settings schema
    python tools/gen_values_schema.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "helm" / "codellama-serve" / "values.schema.json"

# settings key -> the chart value that sets it.
CHART_OWNED: dict[tuple[str, str], str] = {
    ("engine", "model"): "model",
    ("engine", "tensor_parallel_size"): "tensorParallelSize",
    ("ray", "accelerator_type"): "gpu.acceleratorType",
    ("ray", "ray_use_gpu"): "gpu.enabled",
    ("ray", "min_replicas"): "autoscaling.minReplicas",
    ("ray", "max_replicas"): "autoscaling.maxReplicas",
    ("ray", "upscale_delay_s"): "autoscaling.upscaleDelaySeconds",
    ("ray", "downscale_delay_s"): "autoscaling.downscaleDelaySeconds",
    ("server", "drain_timeout_s"): "drain.timeoutSeconds",
    ("auth", "api_keys_file"): "apiKeys.existingSecret",
    ("auth", "api_keys"): "apiKeys.existingSecret",
    ("routing", "ray_ingress"): "rayService.ingress",
    ("lora", "enable_lora"): "lora.enabled",
    ("lora", "lora_modules"): "lora.adapters",
}

SETTINGS_DESCRIPTION = (
    "Server settings as in a `codellama-serve serve --config` file (generated from "
    "engine/config.py by tools/gen_values_schema.py). Keys the chart sets from its own "
    "values are not allowed here: "
    + ", ".join(f"{s}.{k} ({v})" for (s, k), v in CHART_OWNED.items())
)


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve `$ref`s into `#/$defs` and drop titles and defaults (the chart's
    values.yaml holds the defaults that apply)."""
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/$defs/")
            merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {
            k: _inline(v, defs) for k, v in node.items() if k not in ("title", "default", "$defs")
        }
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def settings_schema() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from engine.config import Settings

    raw = Settings.model_json_schema()
    schema = _inline(copy.deepcopy(raw), raw.get("$defs", {}))
    for (section, key), _value in CHART_OWNED.items():
        schema["properties"][section]["properties"].pop(key, None)
    schema["description"] = SETTINGS_DESCRIPTION
    return schema


def render(current: dict[str, Any]) -> str:
    updated = copy.deepcopy(current)
    updated["properties"]["settings"] = settings_schema()
    return json.dumps(updated, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = SCHEMA_PATH.read_text(encoding="utf-8")
    wanted = render(json.loads(text))
    if "--check" in argv:
        if text != wanted:
            print(f"{SCHEMA_PATH}: settings schema is out of date; run tools/gen_values_schema.py")
            return 1
        return 0
    SCHEMA_PATH.write_text(wanted, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
