"""bft: the open pipeline that turns web text into instruction-tuning data (back-and-forth translation).

The base install is what a Beam worker needs (Dataflow installs it with --setup_file ./setup.py):
no torch, no vLLM. Extras add the rest.
"""
from setuptools import find_packages, setup

BEAM = [
    "apache-beam>=2.60",
    "pyarrow>=15",
    "tokenizers>=0.21",
    "huggingface-hub>=0.20",
    "xxhash>=3.4",
    "orjson>=3.9",
    "zstandard>=0.22",
    "isal>=1.6",
    "google-cloud-storage>=2.14",
    "nltk>=3.8",
    "numpy>=1.26",
]

EXTRAS = {
    "gcp": ["apache-beam[gcp]>=2.60"],
    "generate": ["transformers[serving]>=4.50", "torch>=2.3", "aiohttp>=3.9", "httpx>=0.27", "tqdm>=4.66", "pyyaml>=6"],
    "vllm": ["vllm>=0.6"],
    "train": ["transformers>=4.50", "torch>=2.3", "accelerate>=1.0", "datasets>=2.19"],
    "report": ["matplotlib>=3.8", "mistral-common>=1.5", "sentencepiece>=0.2"],  # the paper column's Llama-2-structure counts
    "test": ["pytest>=8", "pytest-xdist>=3.5", "gcp-storage-emulator>=2024.8.3", "datasets>=2.19", "pandas>=2.1",
             "datatrove>=0.4", "psutil>=5.9", "trl>=1.0", "mistral-common>=1.5", "sentencepiece>=0.2",
             "hypothesis>=6.100", "duckdb>=1.0", "polars>=1.0"],
}

setup(
    name="bft",
    version="0.1.0",
    description="Instruction back-and-forth translation: Dolma -> candidates -> generations -> SFT corpus",
    python_requires=">=3.10",
    packages=find_packages(include=["bft", "bft.*", "beam_pipelines", "beam_pipelines.*", "generation",
                                    "generation.*", "training", "training.*", "schemas", "schemas.*", "lifecycle",
                                    "lifecycle.*", "storage", "storage.*"]),
    package_data={"generation": ["templates/*.txt"], "beam_pipelines.report": ["page_template.html", "card_template.md"]},
    install_requires=BEAM,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["bft=bft.cli:entry"]},
)
