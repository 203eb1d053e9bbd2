"""DyDiT (Zhao et al., ICLR 2025): timestep-wise dynamic width + spatial-wise dynamic tokens.

The network pieces sit beside the other models (``maskdit_fast.models``): ``routers`` (Gumbel-sigmoid
decisions, TDW width routers, SDT token router), ``dydit_block`` (:class:`DyDiTBlock`: masked
(training) and fast (sliced / packed) paths), ``routed_tokens`` (SDT packing), ``dydit``
(:class:`DyDiT`, :class:`DyMaskDiT`); this package uses them:

- :mod:`.model`   :func:`to_dydit` converts a trained DiT / MaskDiT, :func:`build_dydit`, :func:`routing_of`
- :mod:`.flops`   per-sample FLOPs from the decisions, constants derived from the model; the
                  papers' static count (:func:`paper_gmacs`);
                  :class:`FlopsMeter`, the FLOPs a sampling run really executed
- :mod:`.finetune` the fine-tune objective and loop
- :mod:`.checkpoint` :func:`save_dydit` / :func:`load_dydit` (``load_checkpoint`` reads them too)

Command line: ``python -m maskdit_fast.dydit finetune --init CKPT --out DIR [key=value ...]``, then
``python sample.py --ckpt DIR/ema.safetensors --out OUT`` (reports the measured FLOPs). See docs/dydit.md.
"""
from ..config import RouterConfig
from ..models.dydit import DyDiT, DyMaskDiT
from ..models.dydit_block import DyDiTBlock, Routing
from ..models.routers import TokenRouter, WidthRouter, gumbel_sigmoid
from .checkpoint import is_dydit, load_dydit, save_dydit
from .config import DyDiTConfig, DyDiTRunConfig, load_dydit_config
from .flops import BlockFlops, FlopsMeter, ModelFlops, model_flops, paper_gmacs
from .model import build_dydit, routing_of, to_dydit

__all__ = [
    "BlockFlops", "DyDiT", "DyDiTBlock", "DyDiTConfig", "DyDiTRunConfig", "DyMaskDiT", "FlopsMeter", "ModelFlops",
    "RouterConfig", "Routing", "TokenRouter", "WidthRouter", "build_dydit", "gumbel_sigmoid", "is_dydit", "load_dydit",
    "load_dydit_config", "model_flops", "paper_gmacs", "routing_of", "save_dydit", "to_dydit",
]
