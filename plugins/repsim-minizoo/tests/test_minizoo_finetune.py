"""Fine-tuning through the core's runner: a snapshot per epoch, step-level path lengths, entries
built from the registry."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from repsim_minizoo import cache, zoo
from repsim_minizoo.config import TINY


def test_finetuned_entry_runs_the_core_runner(tmp_cache: Path) -> None:
    state, record, path = zoo.finetuned("mae", "tiny", 0, progress=False)
    run = zoo.run_dir(path)
    assert tmp_cache in run.parents and (run / "checkpoint.pt").is_file()
    resolved = json.loads((run / "resolved.json").read_text())
    settings = resolved["settings"]
    # The zoo's departures from Table 5; the rest is the preset.
    assert (settings["mixup"], settings["cutmix"], settings["auto_augment"]) == (0, 0, None)
    assert (settings["layer_decay"], settings["drop_path"]) == (0.75, 0.1)
    assert resolved["source"]["model"] == {"model": "minizoo_mae",
                                          "params": {"preset": "tiny", "seed": 0}}
    assert record["steps"] == TINY.finetune.epochs * (1437 // TINY.finetune.batch_size)
    assert all(torch.equal(v, cache.load_weights(run / "final.safetensors")[k])
               for k, v in state.items())
    eff = record["path_efficiency"]
    assert {"all", "attention", "mlp", "norm", "embed", "blocks.0/attention"} <= eff.keys()
    assert all(0 < v <= 1 + 1e-9 for v in eff.values())
    assert zoo.finetuned("mae", "tiny", 0, progress=False)[2] == path  # a cache hit


def test_finetuned_entry_caches_snapshots_and_builds(tmp_cache: Path) -> None:
    from repsim.plugins import registry

    model = registry("model").get("minizoo_mae_ft").create({"preset": "tiny", "progress": False})
    prov = model.provenance
    snaps = [Path(p) for p in prov["snapshots"]]
    assert [p.name for p in snaps] == [f"epoch_{e:03d}.safetensors"
                                       for e in range(TINY.finetune.epochs + 1)]
    assert all(p.is_file() and tmp_cache in p.parents for p in snaps)
    assert 0 < prov["path_efficiency"]["attention"] <= 1
    assert cache.entry_path("mae", zoo.pretrained_key("mae", TINY, 0)).is_file()  # its start
    first = registry("model").get("minizoo_mae_ft").create({"preset": "tiny", "epoch": 0,
                                                            "progress": False})
    pre = registry("model").get("minizoo_mae").create({"preset": "tiny", "progress": False})
    w = "blocks.1.attn.qkv.weight"
    assert torch.equal(first.module.state_dict()[w], pre.module.state_dict()[w])
    assert not torch.equal(model.module.state_dict()[w], pre.module.state_dict()[w])
    x = torch.stack([model.preprocess(torch.rand(1, 8, 8)) for _ in range(3)])
    assert model.module(x).shape == (3, 10)  # class scores
