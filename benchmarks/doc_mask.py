"""``python -m benchmarks.doc_mask``: does masking attention to each document (``--doc-mask``) change what a small
model learns, and what does it cost a step?

Two training runs that differ only in ``--doc-mask``: the same tiny model, data (the generated stories, a few hundred
tokens each, packed into 256-byte windows), seed, steps and schedule, on the torch backend. Reported for each: the
validation loss at every evaluation as the run computes it (with the documents masked when it trains so, not
otherwise), the final model's validation loss with the documents masked (every token predicted from its own story
only, as a story generated from an empty prompt is) and without, and the median time of a step. ``--out DIR``
writes ``doc_mask.json``, ``.csv`` (one row per run and evaluation) and ``.png`` (both runs' curves).

Like every timing here, the step times depend on the machine and what else runs on it: measure on idle cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.results import environment, fmt_num, format_table, pyplot, save_figure, write_results
from kernels.cli import run_cli

BASE_FLAGS = ["--data", "stories", "--tokenizer", "bytes", "--preset", "tiny", "--context-length", "256",
              "--batch-size", "16", "--lr", "5e-3", "--warmup-steps", "30", "--eval-iters", "8", "--no-progress",
              "--kernels", "torch", "--seed", "1"]


def run(doc_mask: bool, steps: int, eval_interval: int, max_docs: int, folder: Path) -> dict:
    """One training run; returns its evaluations, its final model's losses with and without the mask, and the
    median seconds a step."""
    import torch

    from minigpt.metrics import read_metrics_csv
    from minigpt.optim import calc_loss_loader
    from minigpt.token_windows import document_ids
    from minigpt.train import run_trainer
    from minigpt.train_config import TrainConfig
    from minigpt.trainer import Trainer

    flags = BASE_FLAGS + ["--max-steps", str(steps), "--eval-interval", str(eval_interval), "--max-docs",
                          str(max_docs), "--out-dir", str(folder), "--doc-mask" if doc_mask else "--no-doc-mask"]
    trainer = Trainer(TrainConfig.from_args(flags))
    run_trainer(trainer)
    evals = read_metrics_csv(folder / "metrics.csv")
    per_step = [trainer.tokens_per_step / e["tokens_per_s"] for e in evals if e["tokens_per_s"]]
    trainer.model.eval()
    eot = trainer.tokenizer.eot_token
    with torch.no_grad():
        final = {name: calc_loss_loader(trainer.val_loader, trainer.model, trainer.device, token_weighted=True,
                                        eot_token=token)
                 for name, token in (("val_masked", eot), ("val_unmasked", None))}
        # the positions the mask changes: those after an end-of-text within their window
        after = [(document_ids(x, eot) > 0).double().mean().item() for x, _ in trainer.val_loader]
    return dict(doc_mask=doc_mask, evals=[(int(e["step"]), e["val_loss"]) for e in evals],
                step_s=statistics.median(per_step) if per_step else None, masked_share=statistics.fmean(after),
                **final)


def summarize(results: list[dict]) -> str:
    lines = [["on" if r["doc_mask"] else "off", f"{r['evals'][0][1]:.4f}", f"{r['evals'][-1][1]:.4f}",
              f"{r['val_masked']:.4f}", f"{r['val_unmasked']:.4f}",
              fmt_num(1000 * r["step_s"]) if r["step_s"] else "-"] for r in results]
    share = results[0]["masked_share"]
    return (format_table(["--doc-mask", "first val", "last val (as trained)", "val, masked", "val, unmasked",
                          "ms/step"], lines, right={1, 2, 3, 4, 5})
            + f"\n{share:.1%} of the validation positions follow an end-of-text in their window (the mask changes "
              "only those)")


def plot(results: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for r in results:
        steps, losses = zip(*r["evals"])
        ax.plot(steps, losses, marker="o", ms=3, label=f"--doc-mask {'on' if r['doc_mask'] else 'off'}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (as each run evaluates)")
    ax.set_title("tiny model on the generated stories, same seed and steps")
    ax.legend()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.doc_mask", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps of each run (default 300)")
    p.add_argument("--eval-interval", type=int, default=50, help="steps between evaluations (default 50)")
    p.add_argument("--max-docs", type=int, default=2000, help="stories generated (default 2000)")
    p.add_argument("--out", type=Path, help="also write doc_mask.json, .csv and .png in this folder")
    args = p.parse_args(argv)

    def work() -> int:
        import torch

        from benchmarks.common import BenchmarkError, check_out_dir, results_names

        if args.steps < 1 or args.eval_interval < 1 or args.max_docs < 1:
            raise BenchmarkError("--steps, --eval-interval and --max-docs must be positive — e.g. --steps 300")
        if args.out:
            check_out_dir(args.out, results_names("doc_mask"))
        with tempfile.TemporaryDirectory() as tmp:
            results = [run(mask, args.steps, args.eval_interval, args.max_docs, Path(tmp) / f"mask-{mask}")
                       for mask in (False, True)]
        print(summarize(results))
        if args.out:
            rows = [dict(doc_mask=r["doc_mask"], step=step, val_loss=loss, final_val_masked=r["val_masked"],
                         final_val_unmasked=r["val_unmasked"], step_s=r["step_s"], masked_share=r["masked_share"])
                    for r in results for step, loss in r["evals"]]
            meta = dict(environment=environment(torch.device("cpu")), flags=BASE_FLAGS, steps=args.steps,
                        eval_interval=args.eval_interval, max_docs=args.max_docs)
            paths = write_results(args.out, "doc_mask", rows, meta) + [plot(results, args.out / "doc_mask.png")]
            print("wrote " + ", ".join(str(p) for p in paths))
        return 0

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
