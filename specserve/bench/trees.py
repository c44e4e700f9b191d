"""Would candidate trees pay? Greedy replies of a bench run replayed through the suffix trees: the tokens a
tree draft of k nodes would get accepted, against a path draft of k tokens.

A verify window costs what its rows cost, whatever their shape, so at the same k the two cost one target
pass alike (a tree needs an attention mask per branch as well, which the kernels would have to learn). What
a tree can add is acceptance: where the path's guess goes wrong, another branch may be right. The replay
walks each greedy reply of the run as speculation would: at every position it asks the trees (the
request's own, over its prompt and its reply so far, and one over the replies replayed before it, as a
`global` draft cache holds them) for a path and for a tree of up to k tokens, and counts the longest
branch of each that matches the reply; then it moves on by the path's accepted tokens plus the target's
own. Greedy only: the reply is the target's, so what a draft gets accepted is decided by the text.

    python -m specserve.bench.trees bench-out/bench.json [--k 4,8,16] [--spec-factor F]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from arctic_inference.suffix_decoding._C import SuffixTree
from rich.console import Console
from rich.table import Table

from specserve.engine.suffix import MAX_DEPTH, MAX_SPEC_FACTOR, MIN_TOKEN_PROB

TARGET_ONLY = "target-only"  # the bench rows whose replies are the target's own greedy output


def accepted(draft, reply: list[int]) -> int:
    """Tokens of the draft (a path, or a tree by its parents) the target accepts: its longest branch that
    the reply begins with."""
    depth: dict[int, int] = {-1: 0}  # node -> matched depth (absent: the branch failed above it)
    best = 0
    for node, (token, parent) in enumerate(zip(draft.token_ids, draft.parents, strict=True)):
        if parent in depth and depth[parent] < len(reply) and reply[depth[parent]] == token:
            depth[node] = depth[parent] + 1
            best = max(best, depth[node])
    return best


def _best(trees: list[SuffixTree], context: list[int], k: int, spec_factor: float, tree_spec: bool):
    tail = np.asarray(context[-MAX_DEPTH:], dtype=np.int32)
    drafts = [t.speculate_ndarray(tail, k, spec_factor, 0.0, MIN_TOKEN_PROB, tree_spec) for t in trees]
    return max(drafts, key=lambda d: d.score)


def replay(prompt: list[int], reply: list[int], shared: SuffixTree, k: int, spec_factor: float) -> dict:
    """One reply at draft size k (and at most `spec_factor` times the matched suffix's length): target
    passes, and tokens accepted of path and of tree drafts."""
    own = SuffixTree(MAX_DEPTH)
    own.extend(0, prompt)
    position, passes, path_tokens, tree_tokens, tree_nodes = 0, 0, 0, 0, 0
    while position < len(reply):
        context, rest = prompt + reply[:position], reply[position:]
        path = _best([own, shared], context, k, spec_factor, tree_spec=False)
        tree = _best([own, shared], context, k, spec_factor, tree_spec=True)
        got = accepted(path, rest)
        passes, path_tokens = passes + 1, path_tokens + got
        tree_tokens, tree_nodes = tree_tokens + accepted(tree, rest), tree_nodes + len(tree.token_ids)
        step = min(got + 1, len(rest))
        own.extend(0, reply[position : position + step])
        position += step
    return {"passes": passes, "path": path_tokens, "tree": tree_tokens, "tree_nodes": tree_nodes}


def study(bench: dict, ks: list[int], spec_factor: float = MAX_SPEC_FACTOR) -> dict:
    """Per prompt kind and k: accepted tokens per target pass with paths and with trees."""
    from specserve.bench.run import load_prompts
    from specserve.models.fetch import resolve_model
    from specserve.models.registry import DEFAULT_TARGET
    from specserve.models.tokenizer import Tokenizer

    tokenizer = Tokenizer(resolve_model(DEFAULT_TARGET, show_progress=False))  # the pair shares its tokenizer
    messages = {p["prompt"]: p["messages"] for p in load_prompts([Path(f) for f in bench["prompts"]], 0)}
    runs = [r for r in bench["runs"] if r["mode"] == "greedy" and r["config"].startswith(TARGET_ONLY)]
    runs = [r for r in runs if "grammar" not in r["config"]]
    totals: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for k in ks:
        shared = SuffixTree(MAX_DEPTH)  # the replies replayed so far, in the run's order
        for i, run in enumerate(runs):
            prompt = tokenizer.encode(tokenizer.render_chat(messages[run["prompt"]]))
            reply = tokenizer.encode(run["output"])
            for key, value in replay(prompt, reply, shared, k, spec_factor).items():
                totals[(run["kind"], k)][key] += value
                totals[("all", k)][key] += value
            shared.extend(i, reply)
    return {f"{kind} k={k}": dict(t) for (kind, k), t in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", type=Path, help="a `specserve bench` JSON (its greedy target-only rows)")
    parser.add_argument("--k", default="4,8,16", help="draft sizes: tokens of a path, nodes of a tree")
    parser.add_argument(
        "--spec-factor", type=float, default=MAX_SPEC_FACTOR, help="drafts at most this times the match's length"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    result = study(json.loads(args.bench_json.read_text()), [int(k) for k in args.k.split(",")], args.spec_factor)
    title = f"accepted draft tokens per target pass, greedy replies of {args.bench_json.name}"
    table = Table(title=f"{title}, drafts up to {args.spec_factor:g}x the match")
    for column in ("kind, k", "passes", "path", "tree", "tree / path", "tree nodes per pass"):
        table.add_column(column, justify="right")
    for name, t in sorted(result.items()):
        ratio = t["tree"] / t["path"] if t["path"] else float("nan")
        per_pass = [t[key] / t["passes"] for key in ("path", "tree", "tree_nodes")]
        table.add_row(
            name, str(t["passes"]), f"{per_pass[0]:.2f}", f"{per_pass[1]:.2f}", f"{ratio:.2f}", f"{per_pass[2]:.1f}"
        )
    Console().print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
