"""Distributed setup and FSDP2 sharding for train.py: joining the torchrun job, and `--fsdp`.

Under torchrun every rank runs train.py's loop on its share of the global batch; the student is wrapped in
DDP, or with `--fsdp` sharded with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`) for models past one
GPU's memory. Each transformer block is its own unit; parameters, gradients and AdamW state are split over
the ranks (ZeRO-3) and a block's weights are gathered only while it runs. The losses, the VAT capture and the
checkpoint's contents are the DDP run's (tests/test_fsdp.py compares the two runs step by step; the FSDP2
checkpoint is written shard by shard, and either kind of run resumes the other's). Plain `python
train.py` is one process and touches nothing here but `setup`.

  setup              rank, world size and device of this process (joins the job under torchrun)
  fsdp_shard         shard a model in place, one unit per decoder / encoder layer
  mixed_precision    its precision policy: bf16 all-gathers, fp32 gradient reduction on CUDA
  gathered           the root unit gathered while a model generates (in-loop validation)
  full_tensor, shard_like, gather_state_dict, meta_copy
                     whole tensors from shards and back (the saved model is whole)
  trainable_state, optimizer_state, shard_optimizer_state
                     what a DDP (or 1-process) checkpoint stores: whole tensors; and a whole checkpoint sharded
  sharded_state, load_sharded_state, read_whole
                     what an --fsdp checkpoint stores: each rank's shards (torch.distributed.checkpoint), and
                     whole tensors read back from them in one process
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

def init_distributed(backend: str, timeout_minutes: float = 30):
    """Join the torchrun job. torchrun --max-restarts brings every worker back up after one dies, and
    the new workers meet in the SAME store as the dead ones: a survivor could read a dead worker's
    stale address (gloo: "connectFullMesh ... Connection refused"; NCCL: an old unique id, a hang).
    So each attempt's keys live under their own prefix (TORCHELASTIC_RESTART_COUNT).
    `timeout_minutes` (train.py's --dist-timeout) is how long a collective may wait, given to the process
    group itself (NCCL's own default is 10 minutes, shorter than a rank-0-only phase can last: a full-LLM
    checkpoint to a slow file system, in-loop validation) and to the store."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=timeout_minutes)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun hosts the store
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, multi_tenant=True, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"compodistill/attempt_{attempt}", store),
                            rank=rank, world_size=world, timeout=timeout)


def setup(device_flag: str, fsdp: bool = False, timeout_minutes: float = 30) -> tuple:
    """This process's place in the job -> (rank, world, device, distributed). torchrun sets RANK / WORLD_SIZE /
    LOCAL_RANK; plain python is one process. `--fsdp` joins a process group even with one process (FSDP2
    needs a mesh). `device_flag` is train.py's --device: auto (this rank's GPU, else the CPU), cpu, cuda, cuda:N;
    `timeout_minutes` its --dist-timeout (init_distributed)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or fsdp  # DDP, or FSDP2 with --fsdp
    if distributed:
        if not dist.is_initialized():
            init_distributed("nccl" if torch.cuda.is_available() and device_flag != "cpu" else "gloo", timeout_minutes)
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


def gather_objects(obj) -> list:
    """Every rank's `obj` (a small picklable value), in rank order: the data checks' digests (data.shared_digest)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
    the meta device (model.load_pretrained's `prepare`) is sharded before its weights exist. Every rank then
    runs the vision tower in every forward, one blank image where its micro-batch has none
    (MultimodalLM.encode_on_every_rank): a unit's all-gather is a collective, and a rank that skipped the tower
    would leave the others waiting in it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    blocks = [m for m in mllm.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]
    if not blocks:
        raise ValueError(f"--fsdp: no *DecoderLayer / *EncoderLayer module in {type(mllm.language_model).__name__}"
                         " to shard")
    policy = mp_policy or MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(mllm, mesh=mesh, mp_policy=policy)
    if hasattr(mllm, "encode_on_every_rank"):  # a text-only micro-batch still runs the tower (model.embed)
        mllm.encode_on_every_rank = True
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
# What a checkpoint stores. DDP (or 1 process): whole tensors, rank 0 writes them (every rank holds them
# anyway). --fsdp: each rank's shards, written and read by that rank (torch.distributed.checkpoint).

def trainable_state(model: torch.nn.Module) -> dict:
    """The trainable weights, whole, on the CPU (a DDP / 1-process checkpoint: runs.save_checkpoint)."""
    return {k: full_tensor(p.detach()).cpu().clone() for k, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every state tensor whole on the CPU (a DDP / 1-process checkpoint)."""
    sd = optimizer.state_dict()
    return {**sd, "state": {i: {k: (full_tensor(v).cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                            for i, st in sd["state"].items()}}


def shard_optimizer_state(sd: dict, optimizer) -> dict:
    """The inverse of optimizer_state for this optimizer's parameters (index i = i-th parameter, as torch
    numbers them): whole state tensors become DTensors split like their parameter (an --fsdp run resuming a
    DDP checkpoint)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(hasattr(p, "device_mesh") for p in params):
        return sd
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, params))
    return {**sd, "state": {i: {k: (shard_like(v, by_id[i]) if torch.is_tensor(v) and v.shape == by_id[i].shape
                                    and v.dim() else v) for k, v in st.items()} for i, st in sd["state"].items()}}


def sharded_state(model: torch.nn.Module, optimizer) -> dict:
    """{"model": the trainable weights, "optim": the optimizer's state}, by parameter name, as PyTorch's
    state-dict API for torch.distributed.checkpoint gives them (`get_state_dict`): under --fsdp each value is
    this rank's DTensor shard and nothing is gathered; else whole tensors. `dcp.save` of it writes each rank's
    shards; `dcp.load` into it reads what this rank holds, resharding from any world size and from a DDP
    run's whole tensors. (An optimizer before its first step gets zero state from a step with lr 0, to load into.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}  # a tied weight once, as DDP's
    return {"model": {k: v for k, v in weights.items() if k in trainable}, "optim": optim}


def load_sharded_state(model: torch.nn.Module, optimizer, state: dict):
    """The inverse of sharded_state, after dcp.load has filled `state` (`set_state_dict`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


def read_whole(dcp_dir: str, prefix: str = "model") -> dict:
    """Whole tensors (on the CPU) of the `prefix` part of a torch.distributed.checkpoint directory, read in this
    process alone (no process group; `no_dist`), from however many ranks' shards it was written in."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    stored = dcp.FileSystemReader(dcp_dir).read_metadata().state_dict_metadata
    out = {k[len(prefix) + 1:]: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()
           if k.startswith(prefix + ".") and isinstance(m, TensorStorageMetadata)}
    import warnings
    with warnings.catch_warnings():  # DCP warns that it assumes one process: it is told so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({prefix: out}, checkpoint_id=dcp_dir, no_dist=True)
    return out
