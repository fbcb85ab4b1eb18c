"""KFP component: fingerprint-sources (cache keys that change with the data and the code)."""

from kfp import dsl
from qlora_kfp.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def fingerprint_sources(data_source: str, base_model: str) -> str:
    """Digest of the data, the base model and the running code; never cached."""
    from qlora_kfp.fingerprint import fingerprint

    return fingerprint(data_source, base_model)
