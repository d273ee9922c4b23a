"""Distillation from a teacher network (``bats train --teacher``, ``bats binarize --teacher``).

Two losses of the binary-network literature that followed BATS, for a student trained with the
shared training step (:class:`bats_cli.training.fit.TrainJob`):

* the **distributional loss** of ReActNet (Liu et al., ECCV 2020): the KL divergence from the
  teacher's softened output distribution to the student's,
  ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` averaged over the batch (the ``T²`` keeps gradient
  sizes comparable across temperatures, Hinton et al. 2015). ReActNet uses it alone, at T = 1,
  in place of cross-entropy; ``weight`` < 1 mixes cross-entropy back in:
  ``weight · KD + (1 − weight) · CE``. The auxiliary head (cell networks) is distilled the same way
  from the teacher's final logits, with its usual weight.
* **attention matching** of Real-to-Binary Nets (Martinez et al., ICLR 2020): at every cell (or
  ResNet block) output, the spatial attention map ``Q = mean_c A_c²`` flattened and L2-normalised
  per image; the loss is the L2 distance between the student's and the teacher's maps, averaged
  over images and over the matched outputs (an average rather than the paper's sum, so that its
  weight does not depend on the number of cells). It needs the teacher to have the student's
  cells and output shapes: the same genotype and stage shapes, checked before the run starts.

The teacher is any ``bats`` checkpoint (``train``, ``binarize`` or ``packed``) of the same data
set; typically ``bats train GENOTYPE --real``. It runs in eval mode (BatchNorm running statistics,
no drop-path), with every parameter frozen and under ``torch.no_grad``, on the very batch the
student sees (after augmentation and MixUp). It is deterministic, so an interrupted run resumes to
the same result; the run records its path and SHA-256, and a resume whose teacher file changed is
refused.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from bats_cli.core.errors import UserInputError

# ReActNet's distributional loss: alone (weight 1) at temperature 1.
KD_TEMPERATURE = 1.0
KD_WEIGHT = 1.0
ATTENTION_WEIGHT = 0.0
TEACHER_KINDS = ("train", "binarize", "packed")


# --------------------------------------------------------------------------- losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = KD_TEMPERATURE
            ) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over the batch."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return (t * t) * (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Real-to-binary's spatial attention: ``mean_c A_c²`` per image, flattened, unit L2 norm."""
    q = features.float().pow(2).mean(dim=1).flatten(1)
    return F.normalize(q, dim=1)


def attention_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over matched outputs of the per-image L2 distance between attention maps."""
    if len(student) != len(teacher) or not student:
        raise RuntimeError(f"attention matching: {len(student)} student outputs, {len(teacher)} teacher outputs")
    terms = [(attention_map(s) - attention_map(t)).norm(dim=1).mean() for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()


def soft_loss(logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor, *,
              temperature: float, weight: float) -> torch.Tensor:
    """``weight · KD + (1 − weight) · CE``; CE takes MixUp's soft targets too."""
    loss = weight * kd_loss(logits, teacher_logits, temperature)
    if weight < 1:
        loss = loss + (1 - weight) * F.cross_entropy(logits.float(), target)
    return loss


# --------------------------------------------------------------------------- features


def feature_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs attention matching compares: cells, or ResNet blocks."""
    cells = getattr(model, "cells", None)
    if isinstance(cells, nn.ModuleList):
        return list(cells)
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(s, nn.Sequential) for s in stages):
        return [block for stage in stages for block in stage]
    raise UserInputError(f"attention matching: {type(model).__name__} has no cells or blocks to match")


@contextlib.contextmanager
def capture(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``modules`` (in call order) during the ``with`` body."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- the teacher


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Distill:
    """A frozen teacher and the loss settings; what :class:`~bats_cli.training.fit.TrainJob` needs."""

    teacher: nn.Module
    path: str
    sha256: str
    temperature: float = KD_TEMPERATURE
    weight: float = KD_WEIGHT
    attention_weight: float = ATTENTION_WEIGHT
    description: str = ""
    _features: list[nn.Module] = field(default_factory=list, repr=False)

    def record(self) -> dict[str, Any]:
        """What the run's config.json and checkpoints record about the teacher."""
        return {"path": self.path, "sha256": self.sha256, "temperature": self.temperature,
                "weight": self.weight, "attention_weight": self.attention_weight,
                "network": self.description}

    def to(self, device: torch.device, memory_format=torch.contiguous_format) -> "Distill":
        self.teacher.to(device).to(memory_format=memory_format)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's logits on ``x`` and, with attention matching, its feature outputs."""
        self.teacher.eval()  # whatever happened to it, the teacher never trains
        if self.attention_weight > 0:
            with capture(self._features) as feats:
                logits = self.teacher(x)
            return logits, [f.detach() for f in feats]
        return self.teacher(x), []

    def loss(self, output, target: torch.Tensor, teacher_logits: torch.Tensor, *, aux_weight: float,
             student_features: Sequence[torch.Tensor] = (), teacher_features: Sequence[torch.Tensor] = ()
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a training step, as :func:`bats_cli.training.fit._loss` without a teacher."""
        logits, aux = output if isinstance(output, tuple) else (output, None)
        kw = dict(temperature=self.temperature, weight=self.weight)
        loss = soft_loss(logits, target, teacher_logits, **kw)
        if aux is not None and aux_weight > 0:
            loss = loss + aux_weight * soft_loss(aux, target, teacher_logits, **kw)
        if self.attention_weight > 0:
            loss = loss + self.attention_weight * attention_loss(student_features, teacher_features)
        return loss, logits


def _shapes(model: nn.Module, modules: Sequence[nn.Module], input_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Output shapes of ``modules`` for one image, on the meta device (no memory, no time)."""
    from bats_cli.training.plan_measure import meta_twin

    twin = meta_twin(model)
    index = {id(m): i for i, m in enumerate(model.modules())}
    twin_modules = list(twin.modules())
    chosen = [twin_modules[index[id(m)]] for m in modules]
    twin.eval()
    with torch.no_grad(), capture(chosen) as outs:
        twin(torch.empty(1, *input_shape, device="meta"))
    return [tuple(o.shape) for o in outs]


def load_teacher(
    path: str | Path,
    *,
    student: nn.Module,
    settings: dict[str, Any],
    dataset: str,
    input_shape: Sequence[int],
    temperature: float = KD_TEMPERATURE,
    weight: float = KD_WEIGHT,
    attention_weight: float = ATTENTION_WEIGHT,
    expect_sha256: Optional[str] = None,
) -> Distill:
    """Load ``path`` as a frozen teacher for ``student`` and check that the two fit together.

    UserInputError (one line) when the file is no ``bats`` network, was trained on another data
    set or for another number of classes, or — with attention matching — does not have the
    student's cells and output shapes; also when ``expect_sha256`` (a resumed run's) differs.
    """
    from bats_cli.models.modelio import load_model, network_label, network_name

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--teacher {path}: no such file")
    digest = file_sha256(path)
    if expect_sha256 is not None and digest != expect_sha256:
        raise UserInputError(f"cannot resume: --teacher {path} changed since the run started "
                             f"(sha256 {digest[:12]}..., recorded {expect_sha256[:12]}...)")
    loaded = load_model(path, command="--teacher", kinds=TEACHER_KINDS)
    t_settings = loaded.settings
    t_data = (loaded.data or {}).get("name") or loaded.run.get("dataset")
    if t_data is not None and t_data != dataset:
        raise UserInputError(f"--teacher {path} was trained on {t_data}, this run is on {dataset}")
    t_classes, s_classes = t_settings.get("num_classes"), settings.get("num_classes")
    if t_classes != s_classes:
        raise UserInputError(f"--teacher {path} has {t_classes} classes, the student {s_classes}")
    for key in ("in_channels", "kind"):
        if t_settings.get(key) != settings.get(key):
            raise UserInputError(f"--teacher {path}: its {key.replace('_', ' ')} is {t_settings.get(key)!r}, "
                                 f"the student's {settings.get(key)!r}")
    teacher = loaded.model
    teacher.eval()
    teacher.requires_grad_(False)
    distill = Distill(teacher=teacher, path=str(path), sha256=digest, temperature=temperature,
                      weight=weight, attention_weight=attention_weight,
                      description=f"{network_name(loaded.genotype, t_settings)}, {network_label(t_settings)}, "
                                  + ("real" if not t_settings.get("binary_activations") else "binary"))
    if attention_weight > 0:
        from bats_cli.core.archs import arch_of
        from bats_cli.models.modelio import genotype_differs

        s_genotype = getattr(student, "genotype", None)
        same = arch_of(t_settings) == arch_of(settings) and (
            s_genotype is None or loaded.genotype is None
            or not genotype_differs(loaded.genotype.to_json(), s_genotype))
        if not same:
            raise UserInputError(f"--attention-weight needs a teacher with the student's genotype and stage "
                                 f"shapes; --teacher {path} is {network_name(loaded.genotype, t_settings)}, "
                                 "another architecture")
        try:
            t_mods = feature_modules(teacher)
            s_mods = feature_modules(student)
        except UserInputError as exc:
            raise UserInputError(f"--attention-weight: {exc}") from None
        t_shapes = _shapes(teacher, t_mods, input_shape)
        s_shapes = _shapes(student, s_mods, input_shape)
        if t_shapes != s_shapes:
            where = next((i for i, (a, b) in enumerate(zip(s_shapes, t_shapes)) if a != b), min(len(s_shapes), len(t_shapes)))
            detail = (f"{len(s_shapes)} student outputs, {len(t_shapes)} teacher outputs" if len(s_shapes) != len(t_shapes)
                      else f"output {where + 1}: student {tuple(s_shapes[where][1:])}, teacher {tuple(t_shapes[where][1:])}")
            raise UserInputError(f"--attention-weight needs a teacher with the student's cells and stage shapes; "
                                 f"--teacher {path} differs ({detail})")
        distill._features = t_mods
    return distill


def recorded_sha256(meta) -> Optional[str]:
    """The teacher SHA-256 a checkpoint's metadata records (None when it names no teacher)."""
    import json

    text = (meta.extra or {}).get("bats_teacher")
    if not text:
        return None
    try:
        record = json.loads(text)
        digest = record["sha256"]
    except (ValueError, KeyError, TypeError):
        raise UserInputError(f"{meta.path}: unreadable teacher record") from None
    if not isinstance(digest, str) or len(digest) != 64:
        raise UserInputError(f"{meta.path}: unreadable teacher record")
    return digest


def teacher_bytes(distill: Optional[Distill]) -> int:
    """Weights and buffers the teacher holds (the plan counts them)."""
    if distill is None:
        return 0
    m = distill.teacher
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


__all__ = [
    "ATTENTION_WEIGHT",
    "Distill",
    "KD_TEMPERATURE",
    "KD_WEIGHT",
    "attention_loss",
    "attention_map",
    "capture",
    "feature_modules",
    "file_sha256",
    "kd_loss",
    "load_teacher",
    "recorded_sha256",
    "soft_loss",
    "teacher_bytes",
]
