"""fedmeta: backdoor attacks and defenses in federated meta-learning (Chen, Golubchik, Paolieri)."""

import os

# FEDMETA_KERNELS=portable (see fedmeta.fast.kernels): the ISA limits of torch's own libraries, which they read when
# they start, so they are set here, before anything in fedmeta imports torch. MKL_CBWR=AVX2 would still let MKL take
# other code paths on AMD and Intel CPUs of the same ISA; COMPATIBLE takes one path on every x86-64 CPU.
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
PORTABLE = os.environ.get("FEDMETA_KERNELS") == "portable"
if PORTABLE:
    os.environ.update(PORTABLE_ENV)
