"""Packed documents in the model and in training (``--doc-mask``): each position attends only inside its document.

The independent check: a document at positions s .. e - 1 of a window, masked, must compute what the same model
computes on that document ALONE, without any mask but the causal one, once the document's tokens keep their
positions — a copy of the model whose position table is shifted by s (row i holds the original row s + i). The
reference never sees a document id. Then: the triton backend against the torch backend (logits, loss, every
gradient); ``doc_ids=None`` is the call the model always made; and a training run with ``--doc-mask`` on both
backends masks its steps and its evaluations, records the flag, and a resumed run keeps it.
"""
from __future__ import annotations

import copy
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

import kernels
from minigpt import GPTModel
from minigpt.model import KVCache
from minigpt.optim import calc_loss_loader
from minigpt.token_windows import document_ids
from minigpt.train import Trainer, build_parser, train
from tests.conftest import TRITON_DEVICES

EOT = 60  # the end-of-text id of these tests' vocabulary (0 .. 60)
# head_dim 16, T = 24 not a multiple of the interpreter's blocks (as tests/test_model_kernels.py)
CFG = dict(vocab_size=61, context_length=24, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)


# --- document_ids, by hand ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, expected", [
    ([5, 6, 7, 8], [0, 0, 0, 0]),  # no end-of-text: one document
    ([9, 5, 6, 7], [0, 0, 0, 0]),  # end-of-text first: it opens the window's only document
    ([5, 6, 7, 9], [0, 0, 0, 1]),  # end-of-text last: it opens a document of one token
    ([5, 9, 9, 6], [0, 1, 2, 2]),  # consecutive: the first end-of-text is a document of its own
    ([9, 9, 9, 9], [0, 1, 2, 3]),
    ([5, 9, 6, 7, 9, 8], [0, 1, 1, 1, 2, 2]),
])
def test_document_ids_number_the_documents_from_the_windows_start(tokens, expected):
    ids = document_ids(torch.tensor([tokens]), eot_token=9)
    assert ids.dtype == torch.int64 and ids.tolist() == [expected]


def test_document_ids_are_counted_per_row_of_a_batch():
    idx = torch.tensor([[1, 9, 2, 3], [9, 9, 4, 9]])
    assert document_ids(idx, 9).tolist() == [[0, 1, 1, 1], [0, 1, 1, 2]]


# --- the model: masked documents against each document alone -------------------------------------------------------

def _windows() -> torch.Tensor:
    """Two windows of 24 tokens: end-of-text at the first position, documents of one token, two end-of-texts in a
    row, a document that ends the window."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, EOT, (2, 24), generator=g)
    idx[0, [0, 7, 8, 16]] = EOT
    idx[1, [3, 11, 12, 23]] = EOT
    return idx


def _documents(row: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each document of a row: each opens with its end-of-text token (or the row's start) and runs
    to the next one (or the row's end)."""
    starts = [0] + [t for t, token in enumerate(row) if token == EOT and t > 0]
    return list(zip(starts, starts[1:] + [len(row)]))


def _at_positions(model: GPTModel, start: int) -> GPTModel:
    """A copy of ``model`` whose position 0 is ``model``'s position ``start``: a document run alone on it gets the
    position embeddings it has inside the window."""
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        table = shifted.pos_emb.weight
        table[:table.shape[0] - start] = model.pos_emb.weight[start:].clone()
    return shifted


def _each_document_alone(model: GPTModel, idx: torch.Tensor, targets: torch.Tensor):
    """The reference: logits (B, T, V) and the summed cross-entropy, each document run alone, unmasked."""
    logits = torch.empty(*idx.shape, model.cfg.vocab_size, dtype=torch.float64)
    loss_sum = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for b, row in enumerate(idx.tolist()):
            for start, end in _documents(row):
                out = _at_positions(model, start)(idx[b:b + 1, start:end])[0]  # (end - start, V)
                logits[b, start:end] = out
                loss_sum += F.cross_entropy(out, targets[b, start:end], reduction="sum")
    return logits, loss_sum


def _model(kernels_name: str, dtype=torch.float32, device="cpu") -> GPTModel:
    torch.manual_seed(0)
    reference = GPTModel(CFG, kernels="torch")
    model = GPTModel(CFG, kernels=kernels_name)
    model.load_state_dict(reference.state_dict())
    return model.to(device=device, dtype=dtype).eval()


def test_a_masked_window_computes_each_document_as_if_it_were_alone_in_float64():
    model = _model("torch", torch.float64)
    idx = _windows()
    targets = torch.roll(idx, -1, dims=1)
    ref_logits, ref_loss_sum = _each_document_alone(model, idx, targets)
    with torch.no_grad():
        logits = model(idx, doc_ids=document_ids(idx, EOT))
        loss = model(idx, targets=targets, doc_ids=document_ids(idx, EOT))
        plain = model(idx)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss, ref_loss_sum / idx.numel(), rtol=1e-12, atol=1e-12)
    # and the check can fail: without the documents, a document after the first sees the ones before it
    assert not torch.allclose(plain[0, 1:], ref_logits[0, 1:], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(plain[1, :3], ref_logits[1, :3], rtol=1e-10, atol=1e-12)  # the first: no one before


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_the_triton_backend_masks_documents_as_each_document_alone(device):
    model = _model("triton", device=device)
    idx = _windows()
    targets = torch.roll(idx, -1, dims=1)
    ref_logits, ref_loss_sum = _each_document_alone(_model("torch", torch.float64), idx, targets)
    with torch.no_grad():
        logits = model(idx.to(device), doc_ids=document_ids(idx.to(device), EOT))
        loss = model(idx.to(device), targets=targets.to(device), doc_ids=document_ids(idx.to(device), EOT))
    torch.testing.assert_close(logits.double().cpu(), ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss.double().cpu(), ref_loss_sum / idx.numel(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_and_torch_give_the_same_masked_loss_logits_and_every_gradient(device):
    torch_model, tri = _model("torch", device=device).train(), _model("triton", device=device).train()
    idx = _windows().to(device)
    targets = torch.roll(idx, -1, dims=1)
    doc_ids = document_ids(idx, EOT)
    results = []
    for model in (torch_model, tri):
        loss = model(idx, targets=targets, doc_ids=doc_ids)
        loss.backward()
        with torch.no_grad():
            results.append((model(idx, doc_ids=doc_ids), loss))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-5)
    grads = dict(torch_model.named_parameters())
    for name, p in tri.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=2e-5, msg=name)


# --- without documents: the call the model always made ----------------------------------------------------------

class DocumentFreeBackend:
    """A backend written before documents existed: its causal_attention takes no doc_ids."""

    name = "document-free"

    def __init__(self):
        self.torch = kernels.get_backend("torch")
        self.layer_norm, self.gelu = self.torch.layer_norm, self.torch.gelu
        self.linear_cross_entropy = self.torch.linear_cross_entropy

    def causal_attention(self, q, k, v, dropout_p: float = 0.0, scale: float | None = None):
        return self.torch.causal_attention(q, k, v, dropout_p, scale)


def test_without_doc_ids_the_model_is_bit_for_bit_the_path_without_documents():
    torch.manual_seed(1)
    model = GPTModel({**CFG, "drop_rate": 0.1}, kernels="torch")
    old = GPTModel({**CFG, "drop_rate": 0.1}, kernels=DocumentFreeBackend())
    old.load_state_dict(model.state_dict())
    idx = _windows()
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for m in (model, old):  # in training mode: the same dropout masks from the same seed
        torch.manual_seed(2)
        loss = m(idx, targets=targets, doc_ids=None)
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(model.named_parameters(), old.parameters()):
        assert torch.equal(a.grad, b.grad), name
    model.eval(), old.eval()
    with torch.no_grad():
        assert torch.equal(model(idx), old(idx))


def test_one_document_per_window_is_the_plain_causal_attention():
    model = _model("torch", torch.float64)
    idx = torch.randint(0, EOT, (2, 24))  # no end-of-text: every position in document 0
    with torch.no_grad():
        torch.testing.assert_close(model(idx, doc_ids=document_ids(idx, EOT)), model(idx), rtol=1e-12, atol=1e-12)


def test_doc_ids_with_a_kv_cache_or_of_another_shape_are_refused():
    model = _model("torch")
    idx = _windows()
    with pytest.raises(ValueError, match="without kv_cache"):
        model(idx, kv_cache=KVCache(model.cfg, batch_size=2), input_pos=0, doc_ids=document_ids(idx, EOT))
    with pytest.raises(ValueError, match=r"doc_ids must have in_idx's shape \(2, 24\)"):
        model(idx, targets=idx, doc_ids=document_ids(idx, EOT)[:, :-1])


# --- training with --doc-mask ----------------------------------------------------------------------------------------

BASE = ["--data", "stories", "--max-docs", "300", "--tokenizer", "bytes", "--preset", "tiny", "--n-layers", "1",
        "--emb-dim", "32", "--n-heads", "2", "--context-length", "32", "--batch-size", "4", "--no-progress",
        "--device", "cpu", "--eval-iters", "2"]


def _spy_on_losses(monkeypatch) -> list[tuple[bool, bool]]:
    """Record, for every loss the model computes, (in training mode, with doc_ids)."""
    seen = []
    real = GPTModel.forward

    def forward(self, in_idx, *args, targets=None, doc_ids=None, **kw):
        if targets is not None:
            seen.append((self.training, doc_ids is not None))
        return real(self, in_idx, *args, targets=targets, doc_ids=doc_ids, **kw)

    monkeypatch.setattr(GPTModel, "forward", forward)
    return seen


@pytest.mark.parametrize("kernels_name", ["torch", "triton"])
def test_doc_mask_masks_every_step_and_evaluation_and_is_recorded(tmp_path, monkeypatch, capsys, kernels_name):
    out = tmp_path / "out"
    trainer = Trainer(build_parser().parse_args(BASE + ["--kernels", kernels_name, "--doc-mask", "--max-steps", "2",
                                                        "--eval-interval", "2", "--out-dir", str(out)]))
    with trainer:
        trainer.setup()
        eot = trainer.tokenizer.eot_token
        assert trainer.doc_eot == eot
        # the step-0 validation loss, masked and not, from the model before any step
        assert any((x == eot).any() for x, _ in islice(trainer.val_loader, 2))  # so the two must differ
        trainer.raw_model.eval()
        masked = calc_loss_loader(trainer.val_loader, trainer.raw_model, "cpu", 2, eot_token=eot)
        plain = calc_loss_loader(trainer.val_loader, trainer.raw_model, "cpu", 2)
        trainer.raw_model.train()
        assert abs(masked - plain) > 1e-5  # an untrained model: near ln(257) both, yet far above rounding
        seen = _spy_on_losses(monkeypatch)
        summary = trainer.fit()
    assert summary["metrics"][0]["val_loss"] == pytest.approx(masked, rel=1e-6)
    assert (True, True) in seen and (False, True) in seen and all(with_ids for _, with_ids in seen)
    assert "attention masked to each document" in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["doc_mask"] is True


def test_a_resumed_run_keeps_doc_mask_unless_told_otherwise(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--kernels", "torch", "--eval-interval", "1", "--out-dir", str(out)]
    train(build_parser().parse_args(BASE + common + ["--doc-mask", "--max-steps", "1"]))
    for extra, expected in (([], True), (["--no-doc-mask"], False), (["--doc-mask"], True)):
        trainer = Trainer(build_parser().parse_args(BASE + common + ["--resume", "auto", "--max-steps", "2", *extra]))
        trainer.setup()
        assert trainer.config.doc_mask is expected and trainer.config.record()["doc_mask"] is expected
        assert trainer.doc_eot == (trainer.tokenizer.eot_token if expected else None)
    capsys.readouterr()
    summary = train(build_parser().parse_args(BASE + common + ["--resume", "auto", "--max-steps", "2",
                                                               "--no-doc-mask"]))
    assert summary["steps"] == 2 and "attention masked" not in capsys.readouterr().out
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["doc_mask"] is False
