"""The `latentstage` command line: config, params, bench (run, build, bridges, doctor follow)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from engine import params

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_CONFIG_ERROR = 2
EXIT_MODEL_ERROR = 3


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=None,
        help="config.yaml to start from (default: ./config.yaml, else the packaged one)",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        action="append",
        default=[],
        help="merge presets/NAME.yaml over the config (repeatable, in order)",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        dest="sets",
        action="append",
        default=[],
        help="override one key, e.g. --set stream.cfg_type=full (repeatable)",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentstage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    config_cmd = sub.add_parser("config", help="print the merged, validated configuration")
    _add_config_arguments(config_cmd)
    config_cmd.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON schema of config.yaml instead (for editors)",
    )

    params_cmd = sub.add_parser("params", help="print the registry of live parameters")
    params_cmd.add_argument("--json", action="store_true", help="print JSON only")
    params_cmd.add_argument(
        "--output",
        metavar="FILE",
        default=None,
        help="write the JSON to FILE (e.g. td_components/params.json)",
    )

    bench_cmd = sub.add_parser("bench", help="measure throughput ratios side by side in one run")
    _add_config_arguments(bench_cmd)
    bench_cmd.add_argument("--frames", type=int, default=30, help="timed frames per row")
    bench_cmd.add_argument("--warmup", type=int, default=5, help="untimed frames per row")
    bench_cmd.add_argument("--steps", default="1,2,4", help="stream sizes n to compare, e.g. 1,2,4")
    return parser


def _load_config_or_report(args: argparse.Namespace) -> Any:
    from engine.config import ConfigError, load_config

    try:
        return load_config(args.config, presets=args.preset, overrides=args.sets)
    except ConfigError as error:
        print(f"latentstage: configuration error: {error}", file=sys.stderr)
        return None


def _status(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import format_rows, run_bench
    from engine.models.errors import ModelLoadError
    from engine.models.loader import load_models
    from engine.pipeline import PipelineSettings

    config = _load_config_or_report(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    try:
        steps = [int(part) for part in args.steps.split(",") if part.strip()]
    except ValueError:
        print(f"latentstage: --steps {args.steps!r}: allowed: integers like 1,2,4", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.frames < 1 or args.warmup < 0 or not steps or min(steps) < 1 or max(steps) > 8:
        print("latentstage: --frames >= 1, --warmup >= 0, --steps in 1..8", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(f"loading {config.model.id} ...", file=sys.stderr, flush=True)
    try:
        models = load_models(config.model, progress=_status)
    except ModelLoadError as error:
        print(f"latentstage: {error}", file=sys.stderr)
        return EXIT_MODEL_ERROR
    settings = PipelineSettings.from_config(config)
    rows = run_bench(models, settings, args.frames, args.warmup, steps, progress=_status)
    header = (
        f"latentstage bench: {config.model.id} on {models.device} ({str(models.dtype)[6:]}), "
        f"{settings.width}x{settings.height}, t_index_list={settings.t_index_list}, "
        f"{args.frames} frames per row"
    )
    print(format_rows(rows, header))
    return EXIT_OK


def _cmd_config(args: argparse.Namespace) -> int:
    from engine.config import ConfigError, config_json_schema, dump_config, load_config

    if args.schema:
        print(json.dumps(config_json_schema(), indent=2))
        return EXIT_OK
    try:
        config = load_config(args.config, presets=args.preset, overrides=args.sets)
    except ConfigError as error:
        print(f"latentstage: configuration error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print(dump_config(config), end="")
    return EXIT_OK


def _cmd_params(args: argparse.Namespace) -> int:
    data = json.dumps(params.as_json(), indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(data + "\n")
        print(f"wrote {len(params.REGISTRY)} parameters to {args.output}")
        return EXIT_OK
    if args.json:
        print(data)
        return EXIT_OK
    print(params.as_table())
    print()
    print(data)
    return EXIT_OK


_COMMANDS = {"config": _cmd_config, "params": _cmd_params, "bench": _cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
