"""Sampling settings: how tokens are picked, the same fields for the command-line flags of chat.py,
generate.py and serve.py, for batches of answers and for the server's requests, checked once here."""

from dataclasses import asdict, dataclass

from dstrain.errors import UserError


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; the same fields for the CLI flags, batch answers and the server."""
    max_new_tokens: int = 128
    temperature: float = 0.7  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = 0  # None: not reseeded (a server's default, so concurrent requests differ)
    stop: tuple[str, ...] = ()  # extra stop strings (OpenAI's `stop`), cut from the text
    ignore_eos: bool = False  # always generate max_new_tokens (vLLM's flag; benchmarks use it)

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) for the first out-of-range value, or None."""
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", 0 <= self.temperature <= 100, "must be between 0 (greedy) and 100"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be positive (1 is off)"),
            ("stop", all(self.stop) and len(self.stop) <= 4, "takes at most 4 non-empty strings"),
        ]
        return next(((name, message) for name, ok, message in checks if not ok), None)

    def check(self) -> "Sampling":
        if (problem := self.problem()) is not None:
            raise UserError(f"--{problem[0]}: {problem[1]}, got {getattr(self, problem[0])}")
        return self

    def batch_key(self) -> tuple:
        """Requests whose keys match can share one `generate` call (each keeps its own max_new_tokens)."""
        return (self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.seed, self.stop,
                self.ignore_eos)

    def generate_kwargs(self) -> dict:
        kwargs = {"repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            return kwargs | {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
        return kwargs | {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def describe(self) -> dict:
        return asdict(self) | {"stop": list(self.stop)}


def add_sampling_flags(parser, max_new_tokens: int = 128, temperature: float = 0.7) -> None:
    """The sampling flags every inference command takes."""
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0 means greedy decoding")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    parser.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling (1: off)")
    parser.add_argument("--repetition_penalty", type=float, default=1.0, help="above 1 discourages repeats (1: off)")
    parser.add_argument("--seed", type=int, default=0)


def sampling_from_args(args) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed).check()
