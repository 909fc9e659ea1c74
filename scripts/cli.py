"""`wanflow` command line: thin entry points over the runtime."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..runtime import io_dirs, paths
from ..runtime.errors import WanflowError, WorkflowValidationError

log = logging.getLogger("wanflow")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _add_dirs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", help="models folder in ComfyUI's layout (default: $WANFLOW_MODELS or ./models)")
    p.add_argument("--output", help="output folder (default: ./output)")
    p.add_argument("--input", help="input folder for LoadImage (default: ./input)")


def _apply_dirs(args: argparse.Namespace) -> None:
    if args.models:
        paths.set_models_dir(args.models)
    io_dirs.set_io_dirs(input=args.input, output=args.output)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    from ..runtime.cache import add_cache_cli_args

    add_cache_cli_args(p)
    g = p.add_argument_group("multi-GPU (USP)")
    g.add_argument("--gpus", type=int, default=1, help="GPUs for one video (default 1)")
    g.add_argument("--ulysses", type=int, help="Ulysses degree (default: all GPUs not used by --ring / --cfg-parallel)")
    g.add_argument("--ring", type=int, default=1, help="ring-attention degree")
    g.add_argument("--cfg-parallel", action="store_true", help="run cond / uncond on two GPU groups")


def _apply_model_flags(args: argparse.Namespace) -> None:
    """CLI flags (over WANFLOW_/SGLANG_ env vars) become defaults for every loaded model."""
    from ..runtime.cache import cache_config_from_args
    from ..runtime.model_defaults import set_model_defaults
    from ..runtime.parallel import ParallelConfig

    parallel = None
    if args.gpus > 1:
        ulysses = args.ulysses or args.gpus // (args.ring * (2 if args.cfg_parallel else 1))
        parallel = ParallelConfig(gpus=args.gpus, ulysses_degree=ulysses, ring_degree=args.ring,
                                  cfg_parallel=args.cfg_parallel).validate()
    set_model_defaults(cache=cache_config_from_args(args), parallel=parallel)


def _titles(prompt: dict[str, Any]) -> dict[str, str]:
    return {nid: n.get("_meta", {}).get("title") or n.get("class_type", nid) for nid, n in prompt.items()}


def _report(summary: Any, as_json: bool, perf_dump: str | None) -> int:
    if perf_dump:
        Path(perf_dump).write_text(json.dumps(summary.as_dict(), indent=2))
    if as_json:
        _out(json.dumps(summary.as_dict(), indent=2))
    else:
        for text in summary.texts():
            log.info("%s", text)
        for f in summary.files:
            _out(str(f))
        if summary.error:
            log.error("%s: %s", summary.status, summary.error)
    return 0 if summary.status == "success" else 1


def cmd_run(args: argparse.Namespace) -> int:
    from ..nodes import node_registry
    from ..runtime.workflow.run import load_prompt, run_workflow
    from .progress_bar import TqdmListener

    _apply_dirs(args)
    _apply_model_flags(args)
    registry = node_registry()
    prompt, _ = load_prompt(args.file, registry)
    listener = None if args.json else TqdmListener(_titles(prompt))
    summary = run_workflow(args.file, registry, overrides=args.set, seed=args.seed, listener=listener)
    return _report(summary, args.json, args.perf_dump)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..nodes import node_registry
    from ..runtime.workflow.run import apply_overrides, load_prompt
    from ..runtime.workflow.validate import validate_prompt

    _apply_dirs(args)
    registry = node_registry()
    prompt, _ = load_prompt(args.file, registry)
    apply_overrides(prompt, args.set, registry)
    result = validate_prompt(prompt, registry)
    if args.json:
        _out(json.dumps(result.response(), indent=2))
    else:
        _out(result.summary())
    return 0 if result.ok else 1


def cmd_make_tiny_models(args: argparse.Namespace) -> int:
    from ..runtime.tiny import make_tiny_models

    made = make_tiny_models(Path(args.dir))
    _out(f"tiny random smoke-test models (not for real use) in {made.root}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..nodes import node_registry
    from ..runtime.demo import demo_workflow, run_demo
    from ..runtime.workflow.run import load_prompt
    from .progress_bar import TqdmListener

    _apply_dirs(args)
    registry = node_registry()
    titles = _titles(load_prompt(demo_workflow(), registry)[0])
    summary = run_demo(registry, models_dir=paths.models_dir(), listener=TqdmListener(titles))
    for f in summary.files:
        _out(f"wrote {f}")
    _out("(rendered with tiny random smoke-test models: the video is noise by design; point --models at real Wan files for real videos)")
    return 0 if summary.status == "success" else 1


GENERATE_FLAGS = ("model", "prompt", "negative_prompt", "width", "height", "size", "num_frames", "seconds", "fps",
                  "steps", "guidance", "guidance_2", "boundary", "shift", "seed", "image", "end_image")


def cmd_generate(args: argparse.Namespace) -> int:
    from ..nodes import node_registry
    from ..runtime.workflow.run import summarize
    from ..runtime.workflow.templates import GenerationRequest, generate, load_generation_config
    from .progress_bar import TqdmListener

    _apply_dirs(args)
    _apply_model_flags(args)
    base = load_generation_config(args.config) if args.config else {}
    flags = {name: getattr(args, name) for name in GENERATE_FLAGS}
    request = GenerationRequest.from_dict({**base, **{k: v for k, v in flags.items() if v is not None}},
                                          source=args.config or "flags")
    listener = None if args.json else TqdmListener({})
    summary = summarize(generate(request, registry=node_registry(), listener=listener))
    return _report(summary, args.json, args.perf_dump)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..nodes import node_registry
    from ..runtime.server.app import ServeOptions, serve

    _apply_model_flags(args)
    options = ServeOptions(
        models_dir=Path(args.models) if args.models else None,
        output_dir=Path(args.output) if args.output else None,
        input_dir=Path(args.input) if args.input else None,
        user_dir=Path(args.user_dir),
        db_path=Path(args.db) if args.db else None,
        listen=args.listen,
        port=args.port,
        api_key=args.api_key,
        preload=args.preload,
        max_upload_mb=args.max_upload_mb,
    )
    serve(options, node_registry())
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from ..runtime.parallel import worker_main

    return worker_main()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanflow", description="Run Wan2.1 / Wan2.2 video models: workflows, server, benchmarks.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a saved ComfyUI workflow (UI or API format)")
    p.add_argument("file")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE", help="override an input; NODE is an id or a title")
    p.add_argument("--seed", type=int, help="set every seed widget")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of file names")
    p.add_argument("--perf-dump", metavar="FILE", help="write per-node timings as JSON")
    _add_dirs(p)
    _add_model_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="validate a workflow without running it")
    p.add_argument("file")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    p.add_argument("--json", action="store_true")
    _add_dirs(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("generate", help="generate a video from a prompt through a shipped workflow template")
    p.add_argument("--config", help="request file (YAML or JSON); flags override its fields")
    p.add_argument("--model", help="model name, e.g. wan2.1-t2v-1.3b or tiny-wan2.1-t2v")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--size", help="WxH, e.g. 832x480")
    p.add_argument("--num-frames", dest="num_frames", type=int, help="4n+1 frames")
    p.add_argument("--seconds", type=float)
    p.add_argument("--fps", type=int)
    p.add_argument("--steps", "--num-inference-steps", dest="steps", type=int)
    p.add_argument("--guidance", "--guidance-scale", dest="guidance", type=float)
    p.add_argument("--shift", "--flow-shift", dest="shift", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--guidance-2", "--guidance-scale-2", dest="guidance_2", type=float,
                   help="Wan2.2 A14B: guidance of the low-noise expert")
    p.add_argument("--boundary", type=float, help="Wan2.2 A14B: expert switch point (fraction of the schedule)")
    p.add_argument("--image", help="start image in the input folder (image-to-video models)")
    p.add_argument("--end-image", dest="end_image", help="last frame image in the input folder (FLF2V)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--perf-dump", metavar="FILE")
    _add_dirs(p)
    _add_model_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="ComfyUI-compatible API + graph editor + OpenAI-compatible API")
    p.add_argument("--listen", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--api-key", help="require this key (Bearer / X-API-Key / ?token=) on every route")
    p.add_argument("--preload", metavar="MODEL", help="load this model before the first request")
    p.add_argument("--user-dir", default="user", help="editor settings and saved workflows")
    p.add_argument("--db", help="job store (default USER_DIR/wanflow_jobs.sqlite)")
    p.add_argument("--max-upload-mb", type=float, default=100.0)
    _add_dirs(p)
    _add_model_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="render a short video with tiny smoke-test models (made if absent)")
    _add_dirs(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("make-tiny-models", help="write tiny random Wan models in the real file formats")
    p.add_argument("dir")
    p.set_defaults(func=cmd_make_tiny_models)

    sub.add_parser("bench", help="GPU benchmark vs diffusers (see `wanflow bench --help`)", add_help=False)

    p = sub.add_parser("worker", help="a USP rank started by torchrun (multi-node); rank 0 runs `wanflow run`/`generate`")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        # The benchmark has its own flag set (sections, sizes, variants); pass them through.
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command in ("run", "generate"):
        from ..runtime.parallel import is_torchrun_worker, worker_main

        if is_torchrun_worker():
            # Under torchrun every process runs this command; ranks > 0 serve rank 0's jobs.
            return worker_main()
    try:
        return args.func(args)
    except WorkflowValidationError as e:
        log.error("invalid workflow: %s", e.message)  # the message lists every node error
        return 2
    except WanflowError as e:
        log.error("%s", e.message)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
