"""OpenAI-compatible HTTP server for a trained model folder, a LoRA adapter, or a base with several adapters.

    python serve.py --model out/sft --port 8000                  # http://127.0.0.1:8000/v1
    python serve.py --model out/lora                             # an adapter folder, loaded on its base
    python serve.py --model out/pt --lora chat=out/lora1 --lora code=out/lora2   # models: pt, chat, code
    DSTRAIN_API_KEY=secret python serve.py --model out/sft --host 0.0.0.0       # reachable from other hosts
    python serve.py --model out/pt --lora chat=out/lora1 --backend vllm          # vLLM's server (GPU + vllm)
    python serve.py --model out/sft --backend sglang --backend_arg=--tp-size=2   # SGLang's, any flag of its own

Any OpenAI client works unchanged:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")   # any key when none is set
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions (stream: true for server-sent events), POST /v1/completions,
GET /v1/models, GET /health. Requests, streamed or not, join the running batch at every decoding step
(continuous batching, up to --max_batch_size rows) and at most --max_queue wait or run at once; more are
answered 429 at once.
"""

import argparse
import importlib.util
import logging
import os
import shlex
import shutil
import socket
import sys
from pathlib import Path

import torch

from dstrain.cli import cli_entry
from dstrain.errors import UserError
from dstrain.infer.generation import BASE_ADAPTER
from dstrain.infer.model_loading import add_model_flags, load_model_from_args
from dstrain.model.adapters import adapter_base, adapter_config, is_adapter_folder

API_KEY_VARIABLE = "DSTRAIN_API_KEY"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                        help="serve a LoRA adapter over --model as model NAME (repeatable)")
    parser.add_argument("--served_model_name", help="the name of --model in the API (default: its folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", help=f"required as 'Authorization: Bearer KEY' (or set {API_KEY_VARIABLE})")
    parser.add_argument("--max_batch_size", type=int, default=16,
                        help="requests decoding together; others wait for a free row (1: one at a time)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting or running; more get 429")
    parser.add_argument("--default_max_tokens", type=int, default=256, help="when a chat request sets no max_tokens")
    parser.add_argument("--max_tokens_limit", type=int, default=2048, help="the largest max_tokens accepted")
    parser.add_argument("--max_request_bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    parser.add_argument("--max_stop_length", type=int, default=256,
                        help="the longest stop string accepted, in characters")
    parser.add_argument("--backend", choices=["transformers", *EXTERNAL_BACKENDS], default="transformers",
                        help="vllm and sglang: their own servers (GPU), with the same models, names, port and key")
    parser.add_argument("--backend_arg", action="append", default=[], metavar="FLAGS",
                        help="passed to --backend vllm or sglang as it is (repeatable), e.g. "
                             "--backend_arg=--tensor-parallel-size=2 or --backend_arg='--max-model-len 8192'")
    parser.add_argument("--log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def parse_lora_flags(flags: list[str]) -> dict[str, str]:
    adapters = {}
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora {flag}: expected NAME=PATH")
        if name in adapters:
            raise UserError(f"--lora {name}: the name is given twice")
        if not is_adapter_folder(path):
            raise UserError(f"--lora {flag}: no adapter_config.json in {path} (a PEFT adapter folder from lora.py)")
        adapters[name] = path
    return adapters


def check_settings(args) -> None:
    if args.backend_arg and args.backend == "transformers":
        raise UserError("--backend_arg is for --backend vllm or sglang; "
                        "the transformers backend takes serve.py's own flags")
    if args.backend in EXTERNAL_BACKENDS:
        backend_args(args)  # its errors before any check of packages or GPUs
    for name in ("max_batch_size", "max_queue", "default_max_tokens", "max_tokens_limit", "max_request_bytes",
                 "max_stop_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_queue < args.max_batch_size:
        raise UserError(f"--max_queue {args.max_queue} is smaller than --max_batch_size {args.max_batch_size}")


def check_port_free(host: str, port: int) -> None:
    """A clear error before the model loads, rather than uvicorn's after."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror} (choose another --port or --host)") from None


def served_names(args, loaded) -> dict[str, str | None]:
    """API model name -> PEFT adapter name (BASE_ADAPTER: the base alone; None: a model without adapters)."""
    main = args.served_model_name or Path(args.model).resolve().name
    models = {main: loaded.main_adapter or (BASE_ADAPTER if loaded.has_adapters else None)}
    for name in loaded.adapters:
        if name != loaded.main_adapter:
            if name == main:
                raise UserError(f"--lora {name}: the name is taken by --model; choose another")
            models[name] = name
    return models


# ===== vLLM and SGLang: their own OpenAI-compatible servers, started in this process's place =====

EXTERNAL_BACKENDS = ("vllm", "sglang")
# What serve.py's own flags set in the backend's command line: a --backend_arg may not set them again.
OWN_FLAGS = {"vllm": ("--host", "--port", "--served-model-name", "--api-key", "--lora-modules", "--enable-lora",
                      "--trust-remote-code"),
             "sglang": ("--model-path", "--model", "--host", "--port", "--served-model-name", "--api-key",
                        "--lora-paths", "--enable-lora", "--trust-remote-code")}


def backend_args(args) -> list[str]:
    """Every --backend_arg, split as a shell would; one that repeats what serve.py sets is refused."""
    extra = []
    for flag in args.backend_arg:
        try:
            extra += shlex.split(flag)
        except ValueError as error:
            raise UserError(f"--backend_arg {flag}: {error}") from None
    for part in extra:
        name = part.split("=", 1)[0]
        if name in OWN_FLAGS[args.backend]:
            raise UserError(f"--backend_arg {part}: set by serve.py itself (use --model, --lora, --host, --port, "
                            "--served_model_name, --api_key or --trust_remote_code)")
    return extra


def external_models(args, adapters: dict[str, str]) -> tuple[str, str, dict[str, str]]:
    """(base folder, its served name, adapters by served name): an adapter --model serves under its own name
    over its base, as the transformers backend does."""
    base, name = args.model, args.served_model_name or Path(args.model).resolve().name
    if is_adapter_folder(args.model):
        base, adapters = args.base or adapter_base(args.model), {name: args.model} | adapters
        name = Path(base).resolve().name
    return base, name, adapters


def max_lora_rank(adapters: dict[str, str]) -> str:
    return str(max(getattr(adapter_config(path), "r", 16) for path in adapters.values()))


def vllm_command(args, adapters: dict[str, str]) -> list[str]:
    """`vllm serve` with the same models, names and address. No concurrency cap of ours: vLLM schedules
    its own batch (--max-num-seqs and the rest go through --backend_arg)."""
    base, name, adapters = external_models(args, adapters)
    command = ["vllm", "serve", base, "--host", args.host, "--port", str(args.port), "--served-model-name", name]
    if args.trust_remote_code:
        command.append("--trust-remote-code")
    if adapters:
        command += ["--enable-lora", "--max-lora-rank", max_lora_rank(adapters),
                    "--lora-modules", *(f"{key}={path}" for key, path in adapters.items())]
    return command + backend_args(args)


def sglang_command(args, adapters: dict[str, str], api_key: str | None) -> list[str]:
    """SGLang's launch_server with the same models, names, address and key (SGLang reads the key from its
    flags only). No cap of ours: --max-running-requests, --tp-size, --mem-fraction-static... go through
    --backend_arg."""
    base, name, adapters = external_models(args, adapters)
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", base, "--host", args.host,
               "--port", str(args.port), "--served-model-name", name]
    if args.trust_remote_code:
        command.append("--trust-remote-code")
    if api_key:
        command += ["--api-key", api_key]
    if adapters:
        command += ["--enable-lora", "--max-lora-rank", max_lora_rank(adapters),
                    "--lora-paths", *(f"{key}={path}" for key, path in adapters.items())]
    return command + backend_args(args)


def missing_for(backend: str) -> list[str]:
    package = {"vllm": "vllm", "sglang": "sglang"}[backend]
    missing = [] if importlib.util.find_spec(package) else [f"the {package} package (pip install {package})"]
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU")
    if backend == "vllm" and not missing and shutil.which("vllm") is None:
        missing.append("the vllm command on PATH")
    return missing


def run_external(args, adapters: dict[str, str], api_key: str | None) -> None:
    """Hand the process over to vLLM's or SGLang's server, where the package and a CUDA GPU are present."""
    if (missing := missing_for(args.backend)):
        raise UserError(f"--backend {args.backend} needs {' and '.join(missing)}; "
                        "use the default --backend transformers here")
    env = dict(os.environ)
    if args.backend == "vllm":
        command = vllm_command(args, adapters)
        if api_key:
            env["VLLM_API_KEY"] = api_key  # not in argv, where ps shows it
    else:
        command = sglang_command(args, adapters, api_key)
        if api_key:
            print("warning: SGLang reads its API key from its command line only, where the process list shows it "
                  "to other users of this machine", file=sys.stderr)
    shown = ["***" if i and command[i - 1] == "--api-key" else part for i, part in enumerate(command)]
    print(f"Starting {args.backend}:", " ".join(shlex.quote(part) for part in shown), flush=True)
    os.execvpe(command[0], command, env)


@cli_entry
def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    check_settings(args)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    adapters = parse_lora_flags(args.lora)
    check_port_free(args.host, args.port)
    if args.backend in EXTERNAL_BACKENDS:
        return run_external(args, adapters, api_key)

    # ===== 1. the model, with every adapter over one copy of the base =====
    loaded = load_model_from_args(args, adapters)
    models = served_names(args, loaded)

    # ===== 2. the engine (batching worker) and the HTTP app =====
    import uvicorn  # here, so that argument errors come fast

    # The server's own log (failed requests with their ids and tracebacks) beside uvicorn's, on stderr.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("dstrain").addHandler(handler)
    logging.getLogger("dstrain").setLevel(args.log_level.upper())

    from dstrain.infer.engine import GenerationEngine
    from dstrain.infer.openai_api import ServerSettings, build_app

    try:
        engine = GenerationEngine(loaded, args.max_batch_size, args.max_queue).start()
    except ValueError as error:  # a model the continuous batcher cannot run (sliding-window caches)
        raise UserError(str(error)) from None
    app = build_app(engine, ServerSettings(models, api_key, args.default_max_tokens, args.max_tokens_limit,
                                           args.max_request_bytes, args.max_stop_length))
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key (set --api_key or {API_KEY_VARIABLE})",
              file=sys.stderr)
    print(f"Serving {', '.join(models)} at http://{args.host}:{args.port}/v1 on {loaded.model.device} "
          f"(continuous batching of up to {args.max_batch_size} rows, at most {args.max_queue} requests at once)",
          flush=True)

    # ===== 3. serve until Ctrl-C / SIGTERM =====
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
