"""`model.pretrained_file=hub` (`--pretrained hub`): timm loads the model's ImageNet weights from the Hugging Face
hub, through the hub's own cache (`$HF_HOME/hub`). Offline (`HF_HUB_OFFLINE=1`) they must already be cached:
`check_hub_weights` says so before anything starts instead of failing in every worker."""
from __future__ import annotations

from .errors import UserError

HUB = "hub"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order


def hub_repo(model: str) -> str:
    """The hub repository of `model`'s default pretrained weights (e.g. timm/resnet18.a1_in1k)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise UserError(f"--pretrained hub: timm has no Hugging Face hub weights for {model!r}; give a local weight "
                        f"file with --pretrained FILE (model.pretrained_file)")
    return repo


def check_hub_weights(model: str) -> None:
    """Fails in one line when offline with no cached copy; online, timm downloads them when the model is built."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo = hub_repo(model)
    if not constants.is_offline_mode():
        return
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in WEIGHT_FILES):
        return
    raise UserError(f"--pretrained hub: the ImageNet weights of {model} ({repo}) are not in the hub cache "
                    f"{constants.HF_HUB_CACHE} and HF_HUB_OFFLINE=1; go online (unset HF_HUB_OFFLINE, or run "
                    f"`hf download {repo}` once) or give a local weight file with --pretrained FILE")
