"""DyDiT (Zhao et al., ICLR 2025): timestep-wise dynamic width + spatial-wise dynamic tokens.

- :mod:`.routers` Gumbel-sigmoid decisions, TDW width routers, SDT token router
- :mod:`.block`   :class:`DyDiTBlock`: masked (training) and fast (sliced / packed) paths
- :mod:`.model`   :func:`to_dydit` converts a trained DiT / MaskDiT; :class:`DyDiT`, :class:`DyMaskDiT`
- :mod:`.flops`   per-sample FLOPs from the decisions, constants derived from the model;
                  :class:`FlopsMeter`, the FLOPs a sampling run really executed
- :mod:`.finetune` the fine-tune objective and loop
- :mod:`.checkpoint` :func:`save_dydit` / :func:`load_dydit` (``load_checkpoint`` reads them too)

Command line: ``python -m maskdit_fast.dydit finetune --init CKPT --out DIR [key=value ...]``, then
``python sample.py --ckpt DIR/ema.safetensors --out OUT`` (reports the measured FLOPs). See docs/dydit.md.
"""
from .block import DyDiTBlock, Routing
from .checkpoint import is_dydit, load_dydit, save_dydit
from .config import DyDiTConfig, DyDiTRunConfig, RouterConfig, load_dydit_config
from .flops import BlockFlops, FlopsMeter, ModelFlops, model_flops
from .model import DyDiT, DyMaskDiT, build_dydit, routing_of, to_dydit
from .routers import TokenRouter, WidthRouter, gumbel_sigmoid

__all__ = [
    "BlockFlops", "DyDiT", "DyDiTBlock", "DyDiTConfig", "DyDiTRunConfig", "DyMaskDiT", "FlopsMeter", "ModelFlops",
    "RouterConfig", "Routing", "TokenRouter", "WidthRouter", "build_dydit", "gumbel_sigmoid", "is_dydit", "load_dydit",
    "load_dydit_config", "model_flops", "routing_of", "save_dydit", "to_dydit",
]
