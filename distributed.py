"""Distributed setup and FSDP2 sharding for train.py: joining the torchrun job, and `--fsdp`.

Under torchrun every rank runs train.py's loop on its share of the global batch; the student is wrapped in
DDP, or with `--fsdp` sharded with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) for models past one
GPU's memory. Each transformer block is its own unit; parameters, gradients and AdamW state are split over
the ranks (ZeRO-3) and a block's weights are gathered only while it runs. The losses, the VAT capture and the
checkpoint format are the DDP run's (tests/test_fsdp.py compares the two runs step by step). Plain `python
train.py` is one process and touches nothing here but `setup`.

  setup              rank, world size and device of this process (joins the job under torchrun)
  fsdp_shard         shard a model in place, one unit per decoder / encoder layer
  mixed_precision    its precision policy: bf16 all-gathers, fp32 gradient reduction on CUDA
  gathered           the root unit gathered while a model generates (in-loop validation)
  full_tensor, shard_like, gather_state_dict, meta_copy
                     whole tensors from shards and back (checkpoints and the saved model are whole)
  trainable_state, optimizer_state, shard_optimizer_state
                     what a checkpoint stores, the same whether the run was DDP or FSDP2
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# Joining the job

def init_distributed(backend: str):
    """Join the torchrun job. torchrun --max-restarts brings every worker back up after one dies, and
    the new workers meet in the SAME store as the dead ones: a survivor could read a dead worker's
    stale address (gloo: "connectFullMesh ... Connection refused"; NCCL: an old unique id, a hang).
    So each attempt's keys live under their own prefix (TORCHELASTIC_RESTART_COUNT)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, multi_tenant=True,
                          timeout=datetime.timedelta(minutes=30))  # torch's default process-group timeout
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"compodistill/attempt_{attempt}", store),
                            rank=rank, world_size=world)


def setup(device_flag: str, fsdp: bool = False) -> tuple:
    """This process's place in the job -> (rank, world, device, distributed). torchrun sets RANK / WORLD_SIZE /
    LOCAL_RANK; plain python is one process. `--fsdp` joins a process group even with one process (FSDP2
    needs a mesh). `device_flag` is train.py's --device: auto (this rank's GPU, else the CPU), cpu, cuda, cuda:N."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or fsdp  # DDP, or FSDP2 with --fsdp
    if distributed:
        if not dist.is_initialized():
            init_distributed("nccl" if torch.cuda.is_available() and device_flag != "cpu" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local_rank = 0, 1, 0
    if device_flag == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_flag if device_flag != "cuda" else f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device, distributed


# -----------------------------------------------------------------------------
# --fsdp: sharding, and whole tensors from shards

def mixed_precision(device: torch.device):
    """The FSDP2 precision policy for `device`: on CUDA, weights all-gathered and used in bf16 (half the traffic
    and memory of the fp32 master weights, the frozen base under LoRA included) and gradients reduce-scattered
    in fp32 (`MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`); the sharded
    master weights and AdamW stay fp32. Elsewhere (CPU, gloo) None: fp32 throughout, as the DDP run computes."""
    if device.type != "cuda":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def fsdp_shard(mllm: torch.nn.Module, mesh, mp_policy=None) -> torch.nn.Module:
    """Shard a model in place with FSDP2: every decoder layer of the LLM and every encoder layer of the vision
    tower is one unit, the root unit holds the rest (embeddings and LM head, tied or not, the final norms, the
    projector). Parameters move to the mesh's device as they are split. The root's weights stay gathered
    from its forward to its backward, so the chunked loss may read the LM head's weight after the forward
    (and the teacher's, which has no backward, stay gathered). `mp_policy`: FSDP2's MixedPrecisionPolicy
    (`mixed_precision`), None: parameters gathered and gradients reduced in their own dtype. A model built on
    the meta device (model.load_pretrained's `prepare`) is sharded before its weights exist."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = [m for m in mllm.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]
    if not blocks:
        raise ValueError(f"--fsdp: no *DecoderLayer / *EncoderLayer module in {type(mllm.language_model).__name__}"
                         " to shard")
    policy = mp_policy or MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(mllm, mesh=mesh, mp_policy=policy)
    return mllm


@contextlib.contextmanager
def gathered(model):
    """An FSDP2 model's root unit gathered for the duration: generation (in-loop validation) calls the LLM and
    the encoder past the root's forward. A collective: every rank runs the same forwards, on the same items."""
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a sharded (DTensor) tensor, gathered from every rank (a collective); else `t`."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor, the same on every rank) split like the DTensor `like`; else unchanged.
    No communication: each rank keeps its own piece."""
    if not hasattr(like, "device_mesh"):
        return value
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with its parameters on the meta device (no storage) and its buffers copied:
    under --fsdp, rank 0 keeps one, and the gathered weights are loaded into it to save the stage's output."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_state_dict(model: torch.nn.Module, keep: bool) -> dict:
    """model.state_dict() whole, gathered tensor by tensor (a collective: every rank calls it); the CPU
    copies are kept where `keep` (rank 0), dropped elsewhere. A tensor shared by two names (tied embeddings)
    is gathered once and stays shared."""
    state = model.state_dict()  # (state_dict() makes a new tensor per name: identity is the parameter's)
    owner = {k: id(t) for k, t in [*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False)]}
    out, seen = {}, {}
    for k, v in state.items():
        key = owner.get(k, id(v))
        if key not in seen:
            whole = full_tensor(v.detach())
            seen[key] = whole.cpu() if keep else None
        if keep:
            out[k] = seen[key]
    return out


# -----------------------------------------------------------------------------
# What a checkpoint stores: whole tensors, whether the run was DDP or FSDP2

def trainable_state(model: torch.nn.Module) -> dict:
    """The trainable weights, whole, on the CPU. Under --fsdp each is gathered from its shards (a collective:
    every rank calls this, in the same order)."""
    return {k: full_tensor(p.detach()).cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole onto the CPU (collective under
    --fsdp), so a checkpoint reads the same whether it was written by DDP or FSDP2."""
    sd = optimizer.state_dict()
    return {**sd, "state": {i: {k: (full_tensor(v).cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                            for i, st in sd["state"].items()}}


def shard_optimizer_state(sd: dict, optimizer) -> dict:
    """The inverse of optimizer_state for this optimizer's parameters (index i = i-th parameter, as torch
    numbers them): whole state tensors become DTensors split like their parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(hasattr(p, "device_mesh") for p in params):
        return sd
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    return {**sd, "state": {i: {k: (shard_like(v, by_id[i]) if torch.is_tensor(v) and v.shape == by_id[i].shape
                                    and v.dim() else v) for k, v in st.items()} for i, st in sd["state"].items()}}
