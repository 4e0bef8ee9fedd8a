"""fedmeta: backdoor attacks and defenses in federated meta-learning (Chen, Golubchik, Paolieri)."""

import os

# FEDMETA_KERNELS=portable (see fedmeta.fast.kernels): the ISA limits of torch's own libraries, which they read when
# they start, so they are set here, before anything in fedmeta imports torch.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
if os.environ.get("FEDMETA_KERNELS") == "portable":
    os.environ.update(PORTABLE_ENV)
