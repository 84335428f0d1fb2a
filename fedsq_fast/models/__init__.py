"""FedSQ DualCopy models: conversion, mask cache, model zoo, gate stability."""
from .cache import IndexedDataset, MaskCache, MaskCacheFullError  # noqa: F401
from .dualcopy import (  # noqa: F401
    DualCopyModel,
    GateSite,
    TrainModeGateWarning,
    dualcopy,
    load_dualcopy,
    replace_head,
    save_dualcopy,
)
from .stability import gate_stability  # noqa: F401
from .trace import activation_sites  # noqa: F401
from .zoo import (  # noqa: F401
    ChecksumError,
    SVHNCNN,
    build_model,
    list_models,
    load_state_file,
    offline_weights_path,
    verify_sha256,
)
