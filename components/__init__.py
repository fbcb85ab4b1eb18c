"""KFP v2 components: thin typed wrappers, one per stage, over the qlora_kfp library.

Importing this package needs only kfp: every component imports the library inside its body,
so compiling never imports torch.
"""

from qlora_kfp.components.decide import decide_training
from qlora_kfp.components.evaluate import evaluate
from qlora_kfp.components.fingerprint import fingerprint_sources
from qlora_kfp.components.merge import merge
from qlora_kfp.components.preflight import preflight
from qlora_kfp.components.prepare_dataset import prepare_dataset
from qlora_kfp.components.quantize import quantize
from qlora_kfp.components.register import register_model
from qlora_kfp.components.sweep import pick_best_trial
from qlora_kfp.components.tracking import finish_tracking, start_tracking
from qlora_kfp.components.train import train

__all__ = [
    "decide_training",
    "evaluate",
    "finish_tracking",
    "fingerprint_sources",
    "merge",
    "pick_best_trial",
    "preflight",
    "prepare_dataset",
    "quantize",
    "register_model",
    "start_tracking",
    "train",
]
