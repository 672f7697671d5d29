"""Package discovery for setuptools; everything else is in pyproject.toml.

kernels/, recipes/ and conf/ stay top-level folders of the repository (beside their tests, as scripts,
as Hydra's config tree) and install inside the package, as ``python recipes/<name>.py`` and
``personafuse <workflow>`` must read the same files.
"""

from setuptools import find_namespace_packages, setup

MAPPED = {"personafuse.kernels": "kernels", "personafuse.recipes": "recipes", "personafuse.conf": "conf"}
SKIP = ["*__pycache__*", "*.egg-info*"]


def packages() -> list[str]:
    # A clone may hold links personafuse/kernels -> ../kernels (and recipes, conf): those come from MAPPED.
    found = find_namespace_packages(include=["personafuse", "personafuse.*"],
                                    exclude=[*SKIP, *(f"{name}*" for name in MAPPED)])
    for name, folder in MAPPED.items():
        found += [name, *(f"{name}.{sub}" for sub in find_namespace_packages(where=folder, exclude=SKIP))]
    return found


setup(packages=packages(), package_dir=MAPPED)
