"""Fidelity of a model's outputs to a reference's: relative L2 error, top-1 agreement, KL divergence of the
softmax. One definition for the prune report (`passes.compensate.fidelity`) and the search's rewards
(`spa.search.reward`), which differ only in how KL treats probabilities that underflow (`kl`'s `eps`).

Every metric computes in float64 whatever the outputs' dtype.
"""
from __future__ import annotations

import numpy as np


def is_logits(a: np.ndarray) -> bool:
    """An output that looks like class logits: [batch, classes] with more than one class."""
    return a.ndim == 2 and a.shape[1] > 1


def rel_l2(reference, output) -> float:
    """||reference - output|| / ||reference|| over the whole tensor (the denominator at least 1e-12)."""
    a, b = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))


def top1_agreement(reference, output) -> float:
    """Share of rows whose argmax is the same."""
    return float((np.asarray(reference).argmax(1) == np.asarray(output).argmax(1)).mean())


def kl(reference, output, eps: float | None = None) -> float:
    """Mean over rows of KL(softmax(reference) || softmax(output)).

    eps None: from log-softmax, exact where a probability underflows to 0 (the search's reward, which ranks
    nearly identical candidates by it). eps > 0: from the softmax probabilities as sum p (log(p + eps) - log(q +
    eps)) (the prune report's figure; bounded where the output gives a class probability 0)."""
    a, b = np.asarray(reference, np.float64), np.asarray(output, np.float64)
    if eps is None:
        la = a - a.max(1, keepdims=True)
        lb = b - b.max(1, keepdims=True)
        la -= np.log(np.exp(la).sum(1, keepdims=True))
        lb -= np.log(np.exp(lb).sum(1, keepdims=True))
        return float((np.exp(la) * (la - lb)).sum(1).mean())
    pa, pb = softmax(a), softmax(b)
    return float((pa * (np.log(pa + eps) - np.log(pb + eps))).sum(1).mean())


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def compare(teacher: list[np.ndarray], outputs: list[np.ndarray], labels: np.ndarray | None) -> dict:
    """The search's metrics of one candidate: rel_l2 averaged over outputs; agreement, kl (eps None) and, with
    labels, accuracy and teacher_accuracy on the first output that looks like logits."""
    rel = []
    out: dict = {}
    logits_done = False
    for a, b in zip(teacher, outputs):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel.append(rel_l2(a64, b64))
        if not logits_done and is_logits(a64):
            logits_done = True
            out["agreement"] = top1_agreement(a64, b64)
            out["kl"] = kl(a64, b64)
            if labels is not None:
                out["accuracy"] = float((b64.argmax(1) == labels).mean())
                out["teacher_accuracy"] = float((a64.argmax(1) == labels).mean())
    out["rel_l2"] = float(np.mean(rel)) if rel else 0.0
    return out
