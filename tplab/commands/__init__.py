"""Subcommands of ``python -m tplab``: one module each, with ``register(subparsers)``."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from tplab.checks import check_at_most, check_int, check_number, check_threads
from tplab.specs.dtypes import precision, torch_name
from tplab.specs.model import ModelConfig
from tplab.specs.sharding import EXPERT_DISPATCH, check_dispatch, stage_layers


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage block) and exits with status 2."""

    def error(self, message: str):
        flag, _, rest = message.partition(": ")  # "argument --x: --x must be ..." says --x once
        if flag.startswith("argument ") and rest.startswith(flag.removeprefix("argument ").split("/")[0]):
            message = rest
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == [] \
            or action.default is argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {shown})".strip()


def int_list(flag: str, text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; a ValueError naming the flag for anything else, or for nothing."""
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def torch_dtype_name(text: str) -> str:
    """An argparse type: a runtime precision in either spelling ("bf16" or "bfloat16") -> torch's name."""
    try:
        return torch_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def runtime_dtype(text: str) -> str:
    """An argparse type: "auto" (the checkpoint's dtype), or a runtime precision in either spelling."""
    return text if text == "auto" else torch_dtype_name(text)


def precision_of(allowed: tuple[str, ...]):
    """An argparse type: a precision among ``allowed`` in either spelling ("bfloat16" or "bf16") -> its short name."""
    def parse(text: str) -> str:
        try:
            return precision(text, allowed)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = "dtype"
    return parse


def checked(name: str, parse: Callable, check: Callable[[object], object]) -> Callable[[str], object]:
    """An argparse type: ``parse(text)``, then ``check(value)``; either's failure is one line naming the flag."""
    def convert(text: str):
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{name} takes {'an integer' if parse is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    convert.__name__ = name
    return convert


def count(flag: str, high: int | None = None, why: str = "", low: int = 1) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (``why``: what the upper bound protects)."""
    def check(value):
        check_int(flag, value, low)
        if high is not None:
            check_at_most(flag, value, high, why)
    return checked(flag, int, check)


def positive(flag: str, allow_zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > 0 (>= 0 with ``allow_zero``); NaN and infinities are refused."""
    return checked(flag, float, lambda value: check_number(flag, value, strict=not allow_zero))


threads_per_rank = checked("--threads", int, lambda threads: check_threads(threads, "--threads"))


def layer_counts(text: str) -> list[int]:
    """An argparse type for --pp-layers: '10,12,10' -> [10, 12, 10], one line otherwise."""
    try:
        return int_list("--pp-layers", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_pipeline_options(p: argparse.ArgumentParser) -> None:
    """--pp (pipeline stages of tp ranks each) and --pp-layers (decoder layers per stage)."""
    p.add_argument("--pp", type=count("--pp"), default=None,
                   help="pipeline stages, each of tp ranks (default 1, or as many as --pp-layers gives)")
    p.add_argument("--pp-layers", type=layer_counts, default=None,
                   help="decoder layers per stage, e.g. 3,2 (default: the even split, leftover layers to the stages "
                        "before the last)")


def resolve_pp(args: argparse.Namespace, num_layers: int) -> int:
    """The number of stages the flags ask for, checked against the model's layers (ValueError with the choices)."""
    pp = args.pp or (len(args.pp_layers) if args.pp_layers else 1)
    stage_layers(num_layers, pp, args.pp_layers)
    return pp


def add_expert_options(p: argparse.ArgumentParser, modelled: bool = False) -> None:
    """--ep (a mixture's experts whole on the ep ranks of each TP group) and --ep-dispatch (how tokens reach them);
    ``modelled``: also --imbalance, the busiest GPU's share of the routed pairs over the mean."""
    p.add_argument("--ep", type=count("--ep"), default=1,
                   help="a mixture of experts: its experts whole, E/ep on each of the ep = tp ranks of a TP group "
                        "(--tp defaults to it); 1 splits every expert over the tp ranks")
    p.add_argument("--ep-dispatch", choices=EXPERT_DISPATCH, default="all-reduce",
                   help="with --ep: every rank has every token and one all-reduce sums the experts' shares "
                        "(all-reduce), or each rank sends its own tokens to their experts' ranks and back "
                        "(all-to-all)")
    if modelled:
        p.add_argument("--imbalance", type=positive("--imbalance"), default=None,
                       help="with --ep: the busiest GPU's routed pairs over the mean, e.g. measured by generate "
                            "--json (default: the expectation under uniform routing)")


def resolve_tp(config: ModelConfig, tp: int | None, args: argparse.Namespace) -> int:
    """``tp`` (None: --ep's) checked against the model with --ep and --ep-dispatch (ValueError listing the valid
    choices)."""
    tp = args.ep if tp is None else tp
    config.check_tp(tp, args.ep)
    check_dispatch(args.ep_dispatch, tp, args.ep)
    return tp


def resolve_tps(args: argparse.Namespace, config: ModelConfig) -> list[int]:
    """The tp degrees of a --tp list such as "1,2,4" (default: --ep's), each checked by :func:`resolve_tp`."""
    return [resolve_tp(config, tp, args) for tp in (int_list("--tp", args.tp) if args.tp is not None else [None])]
