import pytest

from maskdit_fast.errors import UserError
from maskdit_fast.train.resume_config import changed_keys, check_resumable


def test_changed_keys_names_every_change_but_the_allowed_ones():
    saved = {"model": {"hidden_size": 32, "mask_ratio": 0.5}, "train": {"lr": 1e-4, "max_steps": 10}}
    now = {"model": {"hidden_size": 48, "mask_ratio": 0.5}, "train": {"lr": 2e-4, "max_steps": 20, "spike_zscore": 6}}
    assert changed_keys(saved, now) == ["model.hidden_size", "train.lr"]  # max_steps allowed; spike_zscore is new
    with pytest.raises(UserError, match=r"model.hidden_size \(32 then, 48 now\), train.lr \(0.0001 then, 0.0002 now\)"):
        check_resumable("RUN", saved, now)
    check_resumable("RUN", saved, {**saved, "train": {"lr": 1e-4, "max_steps": 30}})
    with pytest.raises(UserError, match=r"model.mask_ratio \(0.5 then, None now\)"):  # a key that went away
        check_resumable("RUN", saved, {"model": {"hidden_size": 32}, "train": saved["train"]})


def test_a_state_saved_before_train_optimizer_existed_ran_adamw():
    saved = {"train": {"lr": 1e-4}}  # written by a version without train.optimizer: AdamW
    check_resumable("RUN", saved, {"train": {"lr": 1e-4, "optimizer": "adamw"}})
    with pytest.raises(UserError, match=r"train.optimizer \('adamw' then, 'apex_fused_adam' now\)"):
        check_resumable("RUN", saved, {"train": {"lr": 1e-4, "optimizer": "apex_fused_adam"}})
