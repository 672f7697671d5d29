"""Run under ``torchrun --nproc_per_node 2`` (gloo): a PersonaFuse stack sharded with FSDP2's ``fully_shard``
saves the same bundle as the unsharded stack, loads one back (resume), and trains a step.

Usage: torchrun --nproc_per_node 2 tests/fsdp2_bundle.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from personafuse import PersonaFuseConfig, PersonaFuseModel  # noqa: E402
from personafuse.checkpoint import load_weights  # noqa: E402
from personafuse.context import decoder_layers  # noqa: E402
from personafuse.sharding import full_weights, is_dtensor  # noqa: E402
from tests.tiny_models import VOCAB, randomize_experts, tiny_llama  # noqa: E402


def stack(seed: int) -> PersonaFuseModel:
    pf = PersonaFuseModel.from_base(tiny_llama(0, layers=2), PersonaFuseConfig(r=4, alpha=8.0, dropout=0.0))
    randomize_experts(pf, seed, std=0.3)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pf.router.parameters():
            p.normal_(0, 0.3)
    return pf


def shard(pf: PersonaFuseModel, mesh) -> None:
    for layer in decoder_layers(pf.model):
        fully_shard(layer, mesh=mesh)
    fully_shard(pf.model, mesh=mesh)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))

    pf = stack(0)
    with torch.no_grad():
        want = pf(input_ids=ids).logits
    if rank == 0:
        pf.save_pretrained(out / "plain")
    dist.barrier()
    shard(pf, mesh)
    layer = next(iter(pf.moe_layers.values()))
    assert is_dtensor(layer.lora_A) and is_dtensor(next(pf.router.parameters())), "not sharded"
    with torch.no_grad():
        torch.testing.assert_close(pf(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    with full_weights(pf):
        if rank == 0:
            pf.save_pretrained(out / "sharded")
    assert is_dtensor(layer.lora_A), "the shards were not put back"

    resumed = stack(1)  # other experts and router, then the bundle loaded into the shards
    shard(resumed, mesh)
    with full_weights(resumed, write_back=True):
        load_weights(resumed, out / "plain")
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)

    resumed.train()
    resumed(input_ids=ids, labels=ids).loss.backward()
    grad = next(iter(resumed.moe_layers.values())).lora_B.grad
    assert grad is not None and is_dtensor(grad) and grad.full_tensor().abs().sum() > 0
    dist.barrier()
    if rank == 0:
        print("FSDP2 OK")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
