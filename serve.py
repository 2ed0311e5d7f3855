"""OpenAI-compatible HTTP server for a trained model folder, a LoRA adapter, or a base with several adapters.

    python serve.py --model out/sft --port 8000                  # http://127.0.0.1:8000/v1
    python serve.py --model out/lora                             # an adapter folder, loaded on its base
    python serve.py --model out/pt --lora chat=out/lora1 --lora code=out/lora2   # models: pt, chat, code
    DSTRAIN_API_KEY=secret python serve.py --model out/sft --host 0.0.0.0       # reachable from other hosts
    python serve.py --model out/pt --lora chat=out/lora1 --backend vllm          # vLLM's server (GPU + vllm)

Any OpenAI client works unchanged:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")   # any key when none is set
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

Endpoints: POST /v1/chat/completions (stream: true for server-sent events), POST /v1/completions,
GET /v1/models, GET /health. Requests are batched (--max_batch_size) and at most --max_queue wait or
run at once; more are answered 429 at once.
"""

import argparse
import importlib.util
import os
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
    parser.add_argument("--max_batch_size", type=int, default=8, help="requests generated together (1: one at a time)")
    parser.add_argument("--max_queue", type=int, default=64, help="requests waiting or running; more get 429")
    parser.add_argument("--batch_wait_ms", type=float, default=10.0,
                        help="how long a lone request waits for others to batch with")
    parser.add_argument("--default_max_tokens", type=int, default=256, help="when a chat request sets no max_tokens")
    parser.add_argument("--max_tokens_limit", type=int, default=2048, help="the largest max_tokens accepted")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
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
    for name in ("max_batch_size", "max_queue", "default_max_tokens", "max_tokens_limit"):
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


def vllm_command(args, adapters: dict[str, str]) -> list[str]:
    """`vllm serve` with the same models, names and address: vLLM's own OpenAI-compatible server."""
    base, name = args.model, args.served_model_name or Path(args.model).resolve().name
    if is_adapter_folder(args.model):
        base, adapters = args.base or adapter_base(args.model), {name: args.model} | adapters
        name = Path(base).resolve().name
    command = ["vllm", "serve", base, "--host", args.host, "--port", str(args.port), "--served-model-name", name,
               "--max-num-seqs", str(args.max_batch_size)]
    if args.trust_remote_code:
        command.append("--trust-remote-code")
    if adapters:
        ranks = [getattr(adapter_config(path), "r", 16) for path in adapters.values()]
        command += ["--enable-lora", "--max-lora-rank", str(max(ranks)),
                    "--lora-modules", *(f"{key}={path}" for key, path in adapters.items())]
    return command


def run_vllm(args, adapters: dict[str, str], api_key: str | None) -> None:
    """Hand the process over to vLLM's server, where vLLM and a CUDA GPU are present."""
    missing = [what for what, ok in (("the vllm package (pip install vllm)", importlib.util.find_spec("vllm")),
                                     ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if missing or shutil.which("vllm") is None:
        raise UserError(f"--backend vllm needs {' and '.join(missing) or 'the vllm command on PATH'}; "
                        "use the default --backend transformers here")
    command = vllm_command(args, adapters)
    print("Starting vLLM:", " ".join(command), flush=True)
    env = dict(os.environ, **({"VLLM_API_KEY": api_key} if api_key else {}))  # not in argv, where ps shows it
    os.execvpe(command[0], command, env)


@cli_entry
def main(argv=None) -> None:
    args = make_parser().parse_args(argv)
    check_settings(args)
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    adapters = parse_lora_flags(args.lora)
    check_port_free(args.host, args.port)
    if args.backend == "vllm":
        return run_vllm(args, adapters, api_key)

    # ===== 1. the model, with every adapter over one copy of the base =====
    loaded = load_model_from_args(args, adapters)
    models = served_names(args, loaded)

    # ===== 2. the engine (batching worker) and the HTTP app =====
    import uvicorn  # here, so that argument errors come fast

    from dstrain.infer.engine import GenerationEngine
    from dstrain.infer.openai_api import ServerSettings, build_app

    engine = GenerationEngine(loaded, args.max_batch_size, args.max_queue, args.batch_wait_ms / 1000).start()
    app = build_app(engine, ServerSettings(models, api_key, args.default_max_tokens, args.max_tokens_limit))
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host} without an API key (set --api_key or {API_KEY_VARIABLE})",
              file=sys.stderr)
    print(f"Serving {', '.join(models)} at http://{args.host}:{args.port}/v1 on {loaded.model.device} "
          f"(batches of up to {args.max_batch_size}, at most {args.max_queue} requests at once)", flush=True)

    # ===== 3. serve until Ctrl-C / SIGTERM =====
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
