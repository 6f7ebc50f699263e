"""`codellama-serve`: serve, build the demo model, run benchmarks."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic.fields import FieldInfo

from engine.config import ConfigError, Settings, build_settings, env_var, load_yaml, sections
from engine.logs import configure_logging

DESCRIPTION = """\
codellama-serve: a high-throughput OpenAI-compatible server for Code Llama on vLLM.

Every flag can also be set by an environment variable (shown as [env: ...]) or
in a YAML file given with --config (sections: engine, features, server, ...).
A flag beats the env var, which beats the file.

Examples:
  codellama-serve serve                          # the embedded demo model on CPU
  codellama-serve serve --model codellama/CodeLlama-13b-Instruct-hf \\
      --tensor-parallel-size 2 --max-model-len 16384
  codellama-serve serve --config settings.yaml --port 9000   # sections as in --help
"""


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _add_field(group: argparse._ArgumentGroup, name: str, info: FieldInfo) -> None:
    flag = "--" + name.replace("_", "-")
    inner, _ = _unwrap(info.annotation)
    default = info.get_default(call_default_factory=True)
    shown = (
        "none"
        if default is None
        else str(default).lower()
        if isinstance(default, bool)
        else default
    )
    help_text = f"{info.description or ''} [env: {env_var(name)}] (default: {shown})"
    help_text = help_text.replace("%", "%%")  # argparse formats help with %
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if inner is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(inner) is Literal:
        kwargs["choices"] = list(get_args(inner))
        if all(isinstance(c, int) for c in kwargs["choices"]):
            kwargs["type"] = int
    elif get_origin(inner) is list:  # vLLM's `--lora-modules a=/x b=/y`
        kwargs["nargs"] = "+"
        kwargs["metavar"] = name.upper()
    elif inner in (int, float):
        kwargs["type"] = inner
        kwargs["metavar"] = name.upper()
    else:
        kwargs["metavar"] = name.upper()
    group.add_argument(flag, **kwargs)


def _serve_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML settings file [env: CODELLAMA_SERVE_CONFIG]"
    )
    p.add_argument(
        "--ray", action="store_true",
        help="run as a Ray Serve application (starts or joins a Ray cluster)",
    )  # fmt: skip
    p.add_argument(
        "--print-serve-config", action="store_true",
        help="print the Ray Serve config (for `serve deploy` or KubeRay's serveConfigV2) "
        "of these settings and exit",
    )  # fmt: skip
    for section, model in sections().items():
        group = p.add_argument_group(f"{section} settings", (model.__doc__ or "").strip())
        for name, info in model.model_fields.items():
            _add_field(group, name, info)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codellama-serve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    demo = sub.add_parser(
        "demo-model", help="build (if missing) the embedded demo model and print its path"
    )
    demo.add_argument("--rebuild", action="store_true", help="build again even if cached")
    demo.add_argument(
        "--lora", action="store_true",
        help="build (if missing) the demo model's LoRA adapter instead and print its path",
    )  # fmt: skip
    from benchmarks.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    import os

    config_file = args.config or os.environ.get("CODELLAMA_SERVE_CONFIG")
    file_values = load_yaml(config_file) if config_file else None
    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "ray", "print_serve_config")
    }
    return build_settings(file_values=file_values, overrides=flags)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo-model":
        configure_logging("info")
        return _demo_model(args.rebuild, lora=args.lora)
    if args.command == "bench":
        from benchmarks.cli import run_bench

        return run_bench(args)
    try:
        settings = settings_from_args(args)
    except (ConfigError, OSError) as e:
        parser.exit(2, f"codellama-serve: {e}\n")
    if args.print_serve_config:
        import yaml

        from engine.ray_config import serve_config

        print(yaml.safe_dump(serve_config(settings), sort_keys=False), end="")
        return 0
    configure_logging(settings.server.log_level)
    from engine.llm import configure_vllm_logging, has_gpu

    configure_vllm_logging(settings.server.log_level)
    if args.ray:
        import os

        from engine.ray_config import ingress_env

        # Ray reads its ingress flags when Serve is first imported, in this process and in
        # the Ray it starts (which inherits this environment): set them before either.
        os.environ.update(ingress_env(settings))
        from engine.ray_serve import serve_with_ray

        return serve_with_ray(settings)
    from engine.config import resolve
    from engine.llm import EngineSetupError, check_setup
    from engine.server import serve

    resolved = resolve(settings, gpu=has_gpu(), mode="standalone")
    try:
        check_setup(resolved)
    except EngineSetupError as e:
        parser.exit(2, f"codellama-serve: {e}\n")
    return serve(resolved)


def _demo_model(rebuild: bool, lora: bool = False) -> int:
    import shutil

    from engine.demo_lora import demo_lora_path, ensure_demo_lora
    from engine.demo_model import demo_model_path, ensure_demo_model

    if rebuild:
        shutil.rmtree(demo_lora_path() if lora else demo_model_path(), ignore_errors=True)
    print(ensure_demo_lora() if lora else ensure_demo_model())
    return 0


if __name__ == "__main__":
    sys.exit(main())
