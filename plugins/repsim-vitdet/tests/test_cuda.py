"""The detector on a GPU under autocast (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from repsim.plugins import build_part
from repsim_vitdet.model import build_detector
from repsim_vitdet.train import fit, predict


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trains_and_scores_on_cuda_with_autocast(tiny_vit, vitdet_params, precision) -> None:
    params = vitdet_params(steps=2, checkpoint_every=1, milestones=[], warmup_steps=0,
                           precision=precision)
    data = build_part("dataset", "coco_shapes", split="train", train_images=4, size=64)
    det = build_detector(tiny_vit(), blocks=[-1], frozen=False, num_classes=3, image_size=64,
                         channels=16, box_convs=1, box_fc=32, mask_convs=1,
                         proposals_train=(50, 20), proposals_test=(50, 20), roi_batch_size=16,
                         mean=(0.5,) * 3, std=(0.5,) * 3).to("cuda")
    history = fit(det, data, params, seed=0, checkpoint=None)
    assert len(history.loss) == 2 and all(torch.isfinite(torch.tensor(history.loss)))
    assert next(det.parameters()).device.type == "cuda"
    bbox, segm = predict(det, data, range(4), batch_size=2)
    assert len(bbox) == len(segm)
