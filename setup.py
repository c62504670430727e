"""CuMo-HF: CuMo (co-upcycled MoE vision-language model) as a Hub-native transformers model, with TRL training,
a Gradio Space and Hub tooling. Install torch first (`pip install torch==2.13.0` for the CPU build)."""

from setuptools import find_packages, setup

CORE = [
    "torch>=2.6",
    "transformers>=5.16.1,<5.26",  # the remote code is tested at both ends (tests/test_transformers_versions.py)
    "safetensors>=0.4",
    "huggingface_hub>=1.0",
    "pillow>=10",
    "numpy",
    "sentencepiece>=0.2",
    "protobuf",
]
# training needs 5.18+: older ones misplace the assistant-token masks of chats with images
TRAIN = ["transformers>=5.18", "trl==1.16.0", "accelerate>=1.10", "peft>=0.17", "datasets>=3.0", "pyyaml", "tqdm",
         "matplotlib"]
SPACE = ["gradio>=6.0,<7", "gradio_client>=2.0"]
FLASH = ["flash-attn>=2.6"]
TEST = ["pytest>=8", "transformers==5.23.0"]  # the suite runs on the version the project is developed with
# lmms-eval 0.7.3: its evaluator imports filelock._api (gone in filelock 4); its wandb==0.25.0 caps protobuf below 7,
# which sentencepiece 0.2.3 needs to read tokenizer.model. It also pulls torchvision (see the README on CPU torch).
EVAL = ["lmms-eval==0.7.3", "filelock<4", "sentencepiece<0.2.3"]

setup(
    name="cumo-hf",
    version="0.1.0",
    description="CuMo multimodal LLM with co-upcycled MoE blocks, Hub-native for transformers, TRL and Gradio",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling_cumo", "trainer", "trainer.*", "space", "hub_upload",
                                    "evaluation", "evaluation.*"]),
    install_requires=CORE,
    entry_points={
        "console_scripts": [
            "cumo-convert = hub_upload.convert_original:main",
            "cumo-init = trainer.init_model:main",
            "cumo-train = trainer.train:main",
            "cumo-push = hub_upload.push:main",
            "cumo-demo = trainer.demo.__main__:main",
        ],
        # lmms-eval finds `--model cumo` here (its external-model registry)
        "lmms_eval.models": ["cumo = evaluation.manifest:MANIFEST"],
    },
    include_package_data=True,
    package_data={"trainer": ["recipes/*.yaml", "accelerate/*.yaml"], "space": ["README.md", "requirements.txt",
                                                                                "examples/*.png"],
                  "evaluation": ["tasks/*/*.yaml"]},
    extras_require={
        "train": TRAIN,
        "space": SPACE,
        "flash": FLASH,
        "eval": EVAL,
        "test": TEST + TRAIN + SPACE + ["playwright>=1.40"],
        "all": TRAIN + SPACE + TEST,
    },
)
