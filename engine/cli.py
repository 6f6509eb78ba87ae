"""The `latentstage` command line: run, config, params, bench, build, midi, sources, bridges, doctor."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from engine import params
from engine.exitcodes import (
    EXIT_BACKEND_UNAVAILABLE,
    EXIT_BRIDGE_UNAVAILABLE,
    EXIT_CONFIG_ERROR,
    EXIT_MODEL_ERROR,
    EXIT_OK,
    EXIT_START_CHECK,
)

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.5
SOURCES_MAX_TIMEOUT_S = 60.0
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, name)
)
"""Signals that stop `run` cleanly: Ctrl-C, kill, a closed terminal or SSH session, Ctrl-Break."""


def _config_command(sub: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that loads a configuration: ``--config``, ``--preset`` and ``--set``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
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
    return parser


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentstage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    config_cmd = _config_command(sub, "config", "print the merged, validated configuration")
    config_cmd.add_argument(
        "--schema",
        action="store_true",
        help="print the JSON schema of config.yaml instead (for editors)",
    )

    params_cmd = sub.add_parser("params", help="print the registry of live parameters")
    params_cmd.add_argument("--json", action="store_true", help="print JSON only")
    params_cmd.add_argument("--markdown", action="store_true", help="print docs/osc.md")
    params_cmd.add_argument(
        "--output",
        metavar="FILE",
        default=None,
        help="write the JSON to FILE (e.g. td_components/params.json)",
    )

    bench_cmd = _config_command(sub, "bench", "measure throughput ratios side by side in one run")
    bench_cmd.add_argument("--frames", type=int, default=30, help="timed frames per row")
    bench_cmd.add_argument("--warmup", type=int, default=5, help="untimed frames per row")
    bench_cmd.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per row (rows alternate; each is the median)"
    )
    bench_cmd.add_argument("--steps", default="1,2,4", help="stream sizes n to compare, e.g. 1,2,4")
    bench_cmd.add_argument(
        "--compare",
        default="",
        metavar="PEERS",
        help="add the compare rows with these peers beside the floor: diffusers, streamdiffusion "
        "(comma-separated; the paper's code runs when installed: "
        "pip install --no-deps streamdiffusion==0.1.1)",
    )
    bench_cmd.add_argument(
        "--groups",
        default=None,
        metavar="GROUPS",
        help="row groups to run: denoising, guidance, filter, backend, controlnet, flicker, compare, "
        "claims (the paper's claims judged, on builtin:shapes), modulation (the engine's frame loop "
        "with 0 and 4 modulators), feedback (the engine's frame loop with the feedback loop off and "
        "on); default: all but compare, claims, modulation and feedback, and compare with --compare",
    )
    bench_cmd.add_argument(
        "--latency-frames",
        type=int,
        default=None,
        metavar="N",
        help="frames of the engine run that measures end-to-end latency (compare; default: --frames, >= 3)",
    )
    bench_cmd.add_argument(
        "--replicas",
        default=None,
        metavar="COUNTS",
        help="the engine with these numbers of pipeline replicas side by side, e.g. 1,2 (the replicas "
        "group: throughput and latency ratios; alone unless --groups names others)",
    )
    bench_cmd.add_argument(
        "--json", default=None, metavar="FILE", help="also write every figure to FILE as JSON"
    )

    run_cmd = _config_command(sub, "run", "run the engine: input -> StreamDiffusion -> outputs")
    run_cmd.add_argument(
        "--frames", type=int, default=None, metavar="N", help="stop cleanly after N output frames"
    )
    run_cmd.add_argument(
        "--duration", type=float, default=None, metavar="S", help="stop cleanly after S seconds"
    )
    run_cmd.add_argument("--quiet", action="store_true", help="no live status line")
    run_cmd.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="run N replicas of the pipeline, each in its own process (scale.replicas; see scale.devices)",
    )
    run_cmd.add_argument(
        "--supervise",
        action="store_true",
        help="run the engine as a child process and restart it (with every live parameter) when it "
        "crashes or hangs; see the `supervise` config section",
    )
    run_cmd.add_argument(
        "--resume",
        action="store_true",
        help="start from the live state last autosaved to supervise.state_file (after a power cut)",
    )
    # set by the supervisor for its child
    run_cmd.add_argument("--supervised-by", type=int, default=None, metavar="PORT", help=argparse.SUPPRESS)
    run_cmd.add_argument("--restart-count", type=int, default=0, metavar="N", help=argparse.SUPPRESS)

    build_cmd = _config_command(sub, "build", "export / build the engines a configuration needs")
    build_cmd.add_argument(
        "--size",
        metavar="WxH",
        dest="sizes",
        action="append",
        default=[],
        help="also build for this output size, e.g. 768x512 (repeatable): every size a show "
        "switches to with /resolution",
    )

    midi_cmd = _config_command(sub, "midi", "MIDI controllers: list the ports, check a mapping file")
    midi_cmd.add_argument("action", choices=("ports", "check"), help="ports: list them; check NAME")
    midi_cmd.add_argument("name", nargs="?", default=None, help="check: the mapping's name in presets/midi")

    sources_cmd = _config_command(sub, "sources", "list the input sources that can be selected now")
    sources_cmd.add_argument(
        "--json", action="store_true", help='print {"sources": [...], "unavailable": {...}} as JSON'
    )
    sources_cmd.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        metavar="S",
        help=f"listen this long for network senders (NDI, Syphon); 0..{SOURCES_MAX_TIMEOUT_S:g}, default 1",
    )
    sources_cmd.add_argument(
        "--kinds",
        default=None,
        metavar="K,K",
        help="only these kinds: pattern, ndi, spout, syphon, shm, file (default: all)",
    )

    sub.add_parser("bridges", help="list every frame bridge and whether it can run here")
    sub.add_parser("doctor", help="report torch, device, CUDA, TensorRT and each bridge SDK")
    return parser


def _load_config_or_report(args: argparse.Namespace) -> Any:
    from engine.config import ConfigError, load_config

    try:
        return load_config(args.config, presets=args.preset, overrides=args.sets)
    except ConfigError as error:
        print(f"latentstage: configuration error: {error}", file=sys.stderr)
        return None


def _load_models_or_report(config: Any) -> Any:
    """The configured model with progress lines, or None after printing why it failed."""
    from engine.models.errors import ModelLoadError
    from engine.models.loader import load_models

    print(f"loading {config.model.id} ...", file=sys.stderr, flush=True)
    try:
        return load_models(config.model, progress=_status)
    except ModelLoadError as error:
        print(f"latentstage: {error}", file=sys.stderr)
        return None


def _status(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


_E = TypeVar("_E", bound=Enum)


def _enum_list(text: str, kind: type[_E], option: str) -> list[_E] | None:
    """Comma-separated enum values, or None after printing the bad one and what is allowed."""
    chosen = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            chosen.append(kind(part))
        except ValueError:
            allowed = ", ".join(str(member.value) for member in kind)
            print(f"latentstage: {option} {part!r}: allowed: {allowed}", file=sys.stderr)
            return None
    return chosen


def _cmd_bench(args: argparse.Namespace) -> int:
    from engine.accel.backends import AccelSettings, BackendKind, create_backend, unavailable_reason
    from engine.accel.base import VaeShape
    from engine.bench import (
        DEFAULT_GROUPS,
        BenchGroup,
        CompareRequest,
        ReplicaRequest,
        format_report,
        machine_facts,
        run_bench,
    )
    from engine.contenders import Peer
    from engine.models.loader import ModelRequest, load_vae
    from engine.pipeline import PipelineSettings

    config = _load_config_or_report(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    try:
        steps = [int(part) for part in args.steps.split(",") if part.strip()]
    except ValueError:
        print(f"latentstage: --steps {args.steps!r}: allowed: integers like 1,2,4", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.frames < 1 or args.warmup < 0 or args.rounds < 1 or not steps or min(steps) < 1 or max(steps) > 8:
        print("latentstage: --frames >= 1, --warmup >= 0, --rounds >= 1, --steps in 1..8", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    peers = _enum_list(args.compare, Peer, "--compare")
    groups = _enum_list(args.groups or "", BenchGroup, "--groups")
    if peers is None or groups is None:
        return EXIT_CONFIG_ERROR
    if args.groups is not None and not groups:
        print(f"latentstage: --groups {args.groups!r} names no group", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    counts = _replica_counts(args.replicas)
    if counts is None:
        return EXIT_CONFIG_ERROR
    if counts and BenchGroup.REPLICAS not in groups:
        groups.append(BenchGroup.REPLICAS)
    elif BenchGroup.REPLICAS in groups and not counts:
        counts = (1, 2)
    if not groups:
        groups = [*DEFAULT_GROUPS, BenchGroup.COMPARE] if peers else list(DEFAULT_GROUPS)
    latency_frames = args.latency_frames if args.latency_frames is not None else max(3, args.frames)
    if latency_frames < 0:
        print(f"latentstage: --latency-frames {latency_frames}: allowed: 0 (off) or more", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    models = _load_models_or_report(config)
    if models is None:
        return EXIT_MODEL_ERROR
    settings = PipelineSettings.from_config(config)
    extra = []
    if BenchGroup.BACKEND in groups and unavailable_reason(BackendKind.ONNXRUNTIME) is None:
        vae_shape = VaeShape(settings.height, settings.width, models.latent_channels, models.vae_scale_factor)
        accel = AccelSettings.from_config(config.acceleration)
        accel.backend = BackendKind.ONNXRUNTIME
        extra.append(create_backend(models, vae_shape, accel))
    request = ModelRequest.from_config(config.model)
    other_kind = "full" if request.vae == "taesd" else "taesd"
    compare = CompareRequest(
        peers, lambda: load_vae(request, other_kind, models.device, models.dtype), latency_frames
    )
    bench = run_bench(
        models,
        settings,
        args.frames,
        args.warmup,
        steps,
        _status,
        extra,
        groups=groups,
        compare=compare,
        rounds=args.rounds,
        replicas=ReplicaRequest(config, counts) if counts else None,
    )
    header = (
        f"latentstage bench: {config.model.id} on {models.device} ({str(models.dtype)[6:]}), "
        f"{settings.width}x{settings.height}, t_index_list={settings.t_index_list}, "
        f"cfg {settings.cfg_type.value}, {args.frames} frames x {args.rounds} rounds per row"
    )
    print(format_report(bench, header))
    if args.json:
        facts = machine_facts(models)
        facts["settings"] = {
            "width": settings.width,
            "height": settings.height,
            "t_index_list": list(settings.t_index_list),
            "cfg_type": settings.cfg_type.value,
            "guidance_scale": settings.guidance_scale,
            "frames": args.frames,
            "warmup": args.warmup,
            "rounds": args.rounds,
        }
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(bench.as_json(header, facts), handle, indent=2)
            handle.write("\n")
        print(f"wrote {args.json}")
    return EXIT_OK


def _replica_counts(text: str | None) -> tuple[int, ...] | None:
    """``--replicas 1,2``: the counts (empty: not asked), or None after printing what is wrong."""
    if text is None:
        return ()
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1 or max(counts) > 8:
        print(f"latentstage: --replicas {text!r}: allowed: counts 1..8 like 1,2", file=sys.stderr)
        return None
    return counts


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
    if args.markdown:
        print(params.as_markdown(), end="")
        return EXIT_OK
    print(params.as_table())
    print()
    print(data)
    return EXIT_OK


CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "torch._dynamo")
"""Third-party loggers that write hundreds of INFO lines per ONNX export (one per initializer)."""


class _NoTorchvisionNotice(logging.Filter):
    """Drops the exporter's 'torchvision is not installed. Skipping torchvision::nms' warnings:
    four per export, about operators no Stable Diffusion graph has."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torchvision is not installed" not in record.getMessage()


_TORCHVISION_NOTICE = _NoTorchvisionNotice()


def _quiet_chatty_loggers() -> None:
    """Their INFO would bury the status line and the bench table; at DEBUG they say everything."""
    debugging = logging.getLogger().level <= logging.DEBUG
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debugging else logging.WARNING)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    if not debugging and _TORCHVISION_NOTICE not in registration.filters:
        registration.addFilter(_TORCHVISION_NOTICE)


def _configure_logging(level: str, file: str | None) -> None:
    root = logging.getLogger()
    root.setLevel(level)
    _quiet_chatty_loggers()
    if file:
        Path(file).parent.mkdir(parents=True, exist_ok=True)  # the start check made sure it can be
        handler = logging.FileHandler(file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def _unavailable_bridges(config: Any) -> list[str]:
    from bridges.base import BRIDGES, unavailable_reason

    problems = []
    for name in dict.fromkeys([config.input.type, *(output.type for output in config.outputs)]):
        reason = unavailable_reason(name)
        if reason is not None:
            extra = BRIDGES[name].extra
            hint = f"; it needs `pip install latentstage[{extra}]` on a supported platform" if extra else ""
            problems.append(f"the {name} bridge cannot run here: {reason}{hint}")
    return problems


class _StatusPrinter:
    """The live one-line status on a terminal; a log line every 10 s otherwise."""

    def __init__(self, stats: Any, enabled: bool) -> None:
        self._stats = stats
        self._enabled = enabled
        self._tty = sys.stderr.isatty()
        self._next = 0.0
        self._interval = STATUS_INTERVAL_S if self._tty else 10.0

    def __call__(self) -> None:
        now = time.monotonic()
        if not self._enabled or now < self._next:
            return
        self._next = now + self._interval
        line = self._stats.status_line()
        if self._tty:
            sys.stderr.write("\r" + line.ljust(110)[:140])
            sys.stderr.flush()
        else:
            logger.info("%s", line)

    def finish(self) -> None:
        if self._enabled and self._tty:
            sys.stderr.write("\n")


def _make_backend(config: Any, models: Any) -> Any:
    """The configured acceleration backend for ``models`` (engines prepared lazily)."""
    from engine.accel.backends import AccelSettings, create_backend
    from engine.accel.base import VaeShape

    vae_shape = VaeShape(
        config.stream.height, config.stream.width, models.latent_channels, models.vae_scale_factor
    )
    return create_backend(models, vae_shape, AccelSettings.from_config(config.acceleration))


def _cmd_build(args: argparse.Namespace) -> int:
    from engine.accel.backends import BackendKind, unavailable_reason
    from engine.pipeline import PipelineSettings
    from engine.runtime.changes import open_pipeline

    config = _load_config_or_report(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    try:
        sizes = [params.get("resolution").coerce(text) for text in args.sizes]
    except params.ParamError as err:
        print(f"latentstage: --size {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    requested = BackendKind(config.acceleration.backend.value)
    if requested is BackendKind.TORCH:
        print("acceleration.backend is torch: nothing to build (set it to onnxruntime or tensorrt).")
        return EXIT_OK
    reason = unavailable_reason(requested)
    if reason is not None:
        print(f"latentstage: the {requested.value} backend cannot run here: {reason}", file=sys.stderr)
        return EXIT_BACKEND_UNAVAILABLE
    models = _load_models_or_report(config)
    if models is None:
        return EXIT_MODEL_ERROR
    backend = _make_backend(config, models)
    started = time.monotonic()
    pipeline = open_pipeline(models, PipelineSettings.from_config(config), backend)
    keys = [*backend.unet_keys([pipeline.unet_shape()]), *backend.vae_keys()]
    for width, height in sizes:
        try:
            latent = pipeline.models.latent_shape(width, height)
        except params.ParamError as err:
            print(f"latentstage: --size {err}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        vae_shape = pipeline.vae_shape(width, height)
        unet_shape = pipeline.unet_shape(latent_shape=latent)
        _status(f"{width}x{height}")
        backend.prepare_vae(vae_shape, progress=_status)
        backend.prepare_unet(unet_shape, progress=_status)
        backend.retain({pipeline.unet_shape()}, {pipeline.vae_shape()})  # one size in memory at a time
        keys += [*backend.unet_keys([unet_shape]), *backend.vae_keys(vae_shape)]
    print(f"  .. ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
    print(backend.cache.describe(keys))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        args.sets = [*args.sets, f"scale.replicas={args.replicas}"]
    config = _load_config_or_report(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    if (args.frames is not None and args.frames < 1) or (args.duration is not None and args.duration <= 0):
        print("latentstage: --frames must be >= 1 and --duration > 0", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.supervise:
        return _run_supervisor(args, config)
    link = _supervisor_link(args.supervised_by)
    try:
        return _run_engine(args, config, link)
    finally:
        if link is not None:
            link.close()


def _run_engine(args: argparse.Namespace, config: Any, link: Any) -> int:
    from engine.accel.backends import BackendUnavailableError
    from engine.config import media_dir, presets_dir
    from engine.preflight import check_start
    from engine.runtime.engine import engine_from_config

    problems = _unavailable_bridges(config)
    if problems:
        for problem in problems:
            print(f"latentstage: {problem}", file=sys.stderr)
        return EXIT_BRIDGE_UNAVAILABLE
    # the live state is autosaved when a restart (or a later --resume) is to restore it
    state_file = config.supervise.state_file if link is not None or args.resume else None
    scenes = presets_dir(args.config) / "scenes"
    start_problems = check_start(
        config, state_file=state_file, scenes_dir=scenes, midi_dir=presets_dir(args.config) / "midi"
    )
    if start_problems:
        for start_problem in start_problems:
            print(f"latentstage: cannot start: {start_problem}", file=sys.stderr)
        return EXIT_START_CHECK
    _configure_logging(config.logging.level.value, config.logging.file)
    started = time.monotonic()
    models = _load_models_or_report(config)
    if models is None:
        return EXIT_MODEL_ERROR
    print(
        f"  .. model ready in {time.monotonic() - started:.1f} s on {models.device}",
        file=sys.stderr,
    )
    if link is not None and link.stop_requested.is_set():
        return EXIT_OK
    from engine.control.operator import Operator

    operator = Operator() if config.osc.enabled else None  # the preview's operator page steers too
    try:
        backend = _make_backend(config, models)
        extra = {"preview": {"operator": operator}} if operator is not None else None
        engine = engine_from_config(
            config,
            models,
            sink_extra=extra,
            backend=backend,
            keep_recordings=args.resume,
            media_dir=media_dir(args.config),
        )
    except BackendUnavailableError as error:
        print(f"latentstage: {error}", file=sys.stderr)
        return EXIT_BACKEND_UNAVAILABLE
    engine.stats.restarts = args.restart_count
    if engine.replicas is not None and engine.replicas.settings.engine_threads:
        import torch  # CPU replicas have the cores: the engine's own tensor work takes what is left

        torch.set_num_threads(engine.replicas.settings.engine_threads)
    print(f"  .. running on {backend.describe()}", file=sys.stderr)
    try:
        control = _start_control(config, args.config, engine, operator)
    except OSError as error:  # the start check found the port free; another program took it since
        engine.close()
        print(f"latentstage: cannot start: {error}", file=sys.stderr)
        return EXIT_START_CHECK
    autosaver = None
    if state_file is not None:
        autosaver = _restore_and_autosave(engine, state_file, resume=args.resume)
    if link is not None:
        link.attach(engine, lambda: engine.stats.state.value)
    printer = _StatusPrinter(engine.stats, enabled=not args.quiet)
    try:
        with _stopped_by_signals(engine.stop, "stopping"):
            engine.run(max_frames=args.frames, duration=args.duration, tick=printer)
    finally:
        printer.finish()
        engine.close()
        if control is not None:
            control.close()
        if autosaver is not None:
            autosaver.close()
    summary = engine.stats.snapshot()
    print(
        f"stopped: {engine.frames_emitted} frames out, {summary['frames_in']} in, "
        f"latency {summary['latency_ms']} ms (p95 {summary['latency_p95_ms']}), "
        f"skip rate {summary['skip_rate']:.1%}, dropped inputs {summary['input_dropped']}, "
        f"superseded inputs {summary['input_superseded']} (newest frame wins)"
        + (
            f", replicas {summary['replicas']}/{summary['replicas_configured']} playing"
            if summary["replicas_configured"] > 1
            else ""
        ),
        file=sys.stderr,
    )
    return EXIT_OK


def _supervisor_link(port: int | None) -> Any:
    """The child's end of the supervisor link (``--supervised-by PORT``), or None."""
    if port is None:
        return None
    from engine.runtime.heartbeat import SupervisorLink

    return SupervisorLink(port, sys.stdin.buffer)


def _restore_and_autosave(engine: Any, state_file: str, resume: bool) -> Any:
    """Restore the autosaved live state (``resume``) and save every accepted change from now on."""
    from engine.runtime.autosave import Autosaver, LiveStateFile

    file = LiveStateFile(state_file)
    file.remove_stale_temporaries()  # what writes killed mid-way (a crash, a power cut) left behind
    if resume:
        values = file.read()
        restored = engine.restore(values) if values else {}
        prompt = restored.get("prompt")
        print(
            f"  .. restored {len(restored)} live parameters from {state_file}"
            + (f" (prompt {prompt[:60]!r})" if prompt else ""),
            file=sys.stderr,
        )
    autosaver = Autosaver(file)
    autosaver.request(engine.control.applied())
    echo = engine.on_applied

    def applied(accepted: dict[str, Any]) -> None:
        if echo is not None:
            echo(accepted)
        autosaver.request(engine.control.applied())

    engine.on_applied = applied
    return autosaver


def _run_supervisor(args: argparse.Namespace, config: Any) -> int:
    """``run --supervise``: this process watches; the engine runs as its child."""
    from engine.control.transport import FeedbackSender, parse_target
    from engine.runtime.supervisor import Supervisor, SupervisorSettings, child_command

    _configure_logging(config.logging.level.value, config.logging.file)
    feedback = FeedbackSender([parse_target(t) for t in config.osc.feedback] if config.osc.enabled else [])

    def announce(state: str, restarts: int, message: str) -> None:
        feedback.send("/engine/state", [state])
        feedback.send("/engine/restarts", [restarts])
        feedback.send("/engine/error", [message[:500]])

    supervisor = Supervisor(
        lambda restarts, port: child_command(args.raw_argv, restarts, port),
        SupervisorSettings.from_config(config.supervise),
        announce,
    )
    print(
        f"  .. supervising: restart on a crash or a hang of {config.supervise.hang_seconds:g} s, "
        f"at most {config.supervise.max_restarts} in {config.supervise.window_minutes:g} min; "
        f"live state in {config.supervise.state_file}",
        file=sys.stderr,
    )
    try:
        with _stopped_by_signals(supervisor.stop, "stopping the engine and the supervisor"):
            return supervisor.run()
    finally:
        feedback.close()


@contextlib.contextmanager
def _stopped_by_signals(stop: Callable[[], None], doing: str) -> Iterator[None]:
    """Inside, every stop signal (``STOP_SIGNALS``) is logged and calls ``stop``; restored after."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def request_stop(signum: int, _frame: Any) -> None:
        logger.info("signal %s: %s", signal.Signals(signum).name, doing)
        stop()

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_control(config: Any, config_path: str | None, engine: Any, operator: Any = None) -> Any:
    """The OSC control service for a running engine (None when ``osc.enabled`` is false); it
    serves the preview's operator page too."""
    from engine.config import media_dir, presets_dir
    from engine.control.service import ControlService, ControlSettings

    if not config.osc.enabled:
        return None
    settings = ControlSettings.from_config(
        config.osc, presets_dir(config_path) / "scenes", media_dir(config_path)
    )
    service = ControlService(settings, engine.control, engine.submit, engine.status, operator, engine.music)
    engine.on_applied = service.echo
    engine.on_error = service.error
    if config.midi.mappings:
        from engine.midi.service import MidiService, MidiSettings

        midi = MidiSettings.from_config(config.midi, presets_dir(config_path) / "midi")
        state = engine.control
        lookup, applied = state.latest, state.applied
        service.attach_midi(
            MidiService(midi, service.dispatcher, lookup, applied, service.announce, engine.status)
        )
    if engine.source_names is not None:
        from engine.runtime.thumbnails import Thumbnails

        service.thumbnails = Thumbnails(
            engine.source_names, lambda: str(engine.runtime_state["input_source"]), engine.last_input_frame
        ).jpeg
    service.start()
    if service.midi is not None:
        print(f"  .. MIDI: {service.midi.status_text()}", file=sys.stderr)
    print(
        f"  .. OSC on {settings.host}:{service.port}, feedback to {', '.join(settings.feedback) or 'nobody'}"
        + (
            f", OSCQuery on http://{settings.host}:{settings.oscquery_port}/"
            if settings.oscquery_port
            else ""
        ),
        file=sys.stderr,
    )
    return service


def _cmd_bridges(args: argparse.Namespace) -> int:
    from bridges.base import BRIDGES, unavailable_reason

    print(f"{'bridge':<9} {'in':<3} {'out':<4} {'available':<10} details")
    for info in BRIDGES.values():
        reason = unavailable_reason(info.name)
        status = "yes" if reason is None else "no"
        detail = (
            info.summary
            if reason is None
            else f"{reason} (pip install latentstage[{info.extra}])"
            if info.extra
            else reason
        )
        directions = f"{'in' if info.source else '-':<3} {'out' if info.sink else '-':<4}"
        print(f"{info.name:<9} {directions} {status:<10} {detail}")
    return EXIT_OK


def _cmd_sources(args: argparse.Namespace) -> int:
    """``sources``: what could be selected as the input now (one line each), then the kinds
    that cannot be listed here and why."""
    from bridges.discovery import SourceKind, discover
    from engine.config import media_dir

    config = _load_config_or_report(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    if not 0 <= args.timeout <= SOURCES_MAX_TIMEOUT_S:
        print(
            f"latentstage: --timeout {args.timeout:g}: allowed: 0 to {SOURCES_MAX_TIMEOUT_S:g} seconds",
            file=sys.stderr,
        )
        return EXIT_CONFIG_ERROR
    kinds = None
    if args.kinds is not None:
        kinds = _enum_list(args.kinds, SourceKind, "--kinds")
        if kinds is None:
            return EXIT_CONFIG_ERROR
        if not kinds:
            print(f"latentstage: --kinds {args.kinds!r} names no kind", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    folder = media_dir(args.config)
    found = discover(kinds, folder, args.timeout)
    if args.json:
        print(json.dumps(found.as_json(), indent=2))
        return EXIT_OK
    name_width = max((len(source.name) for source in found.sources), default=0)
    label_width = max((len(source.label) for source in found.sources), default=0)
    for source in found.sources:
        print(f"{source.name:<{name_width}}  {source.label:<{label_width}}  {source.detail}".rstrip())
    for kind, reason in found.unavailable.items():
        where = f"; put video files in {folder}" if kind is SourceKind.FILE else ""
        print(f"{kind.value}: not available ({reason}{where})")
    return EXIT_OK


def _cmd_midi(args: argparse.Namespace) -> int:
    """``midi ports``: the inputs and outputs (or none and why); ``midi check NAME``: a mapping."""
    from engine.config import presets_dir
    from engine.midi.ports_report import check_report, ports_report

    config = _load_config_or_report(args)
    if config is None:
        return EXIT_CONFIG_ERROR
    folder = presets_dir(args.config) / "midi"
    if args.action == "ports":
        text, ok = ports_report(config.midi.backend, folder)
        print(text, file=sys.stdout if ok else sys.stderr)
        return EXIT_OK
    if args.name is None:
        print("latentstage midi check: which mapping? e.g. latentstage midi check example", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    text, ok = check_report(folder, args.name)
    print(text, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_CONFIG_ERROR


def _cmd_doctor(args: argparse.Namespace) -> int:
    from engine.doctor import report

    print(report())
    return EXIT_OK


_COMMANDS = {
    "config": _cmd_config,
    "params": _cmd_params,
    "bench": _cmd_bench,
    "run": _cmd_run,
    "build": _cmd_build,
    "bridges": _cmd_bridges,
    "doctor": _cmd_doctor,
    "midi": _cmd_midi,
    "sources": _cmd_sources,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _build_parser().parse_args(raw)
    args.raw_argv = raw
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_chatty_loggers()  # every command (build and bench export too)
    return _COMMANDS[args.command](args)


def console_main() -> None:
    """Entry point of the ``latentstage`` console script (and ``python -m engine.cli``).

    Once a command has returned, everything it opened is closed and flushed; the process
    then ends at once instead of running Python's finalisation, which spends 1-5 s
    collecting torch's and diffusers' module graphs — time a stop on stage does not have.
    """
    try:
        status = main()
        logging.shutdown()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away (`latentstage params | head`): nothing to tell it
        status = EXIT_OK
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    console_main()
