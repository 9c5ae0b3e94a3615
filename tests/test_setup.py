"""env.sh, which run.sh and test.sh source, against a stand-in python3 with no package index: a virtual environment
whose packages are stub modules. python3 is used as it is where it has what a script needs; else .venv sees
python3's packages (its .pth files too) and gets only the missing ones; what pip cannot install is named in one line
with the command that installs it."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def purelib(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())


def stub(folder: Path, name: str, version: str):
    """A package that imports and says where it lies, with the metadata pip reads."""
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text("import os\nWHERE = os.path.dirname(__file__)\n")
    (folder / f"{name}-{version}.dist-info").mkdir()
    (folder / f"{name}-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def make_parent(tmp_path: Path, with_torch=True, torch_version="2.11.0") -> Path:
    """python3 as a virtual environment of its own (not the base interpreter's packages) holding stubs of torch and
    numpy, and scipy in a folder that one of its .pth files adds, as editable installs and conda environments do."""
    venv = tmp_path / "parent"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = purelib(venv / "bin" / "python")
    for name, version in [("torch", torch_version), ("numpy", "2.0.0")][0 if with_torch else 1:]:
        stub(site, name, version)
    stub(tmp_path / "elsewhere", "scipy", "1.14.0")
    (site / "elsewhere.pth").write_text(f"{tmp_path / 'elsewhere'}\n")
    return venv


def wheel(folder: Path, name: str, version: str):
    """A wheel of a stub package, for a local folder that stands in for the package index."""
    folder.mkdir(exist_ok=True)
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "import os\nWHERE = os.path.dirname(__file__)\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)


@pytest.fixture
def repo(tmp_path):
    """env.sh and requirements.txt in a folder of their own, where .venv may be made."""
    folder = tmp_path / "repo"
    folder.mkdir()
    for name in ("env.sh", "requirements.txt"):
        shutil.copy(ROOT / name, folder / name)
    return folder


def env_sh(repo: Path, parent: Path, script: str, *args, gpus=0, **pip_env):
    """script, after sourcing env.sh, in a shell with the parent first on PATH and no package index."""
    tools = repo.parent / "tools"
    tools.mkdir(exist_ok=True)
    (tools / "nvidia-smi").write_text("#!/bin/sh\n" + "echo 'GPU 0: Stand-in GPU'\n" * gpus + f"exit {0 if gpus else 9}\n")
    (tools / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{parent / 'bin'}:{tools}:/usr/bin:/bin", "HOME": str(repo.parent), "PIP_CONFIG_FILE": os.devnull,
           "PIP_NO_INDEX": "1", **pip_env}
    return subprocess.run(["bash", "-c", ". ./env.sh\n" + script, "env.sh", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


SHOW_MODULES = """echo "PY=$PY"
"$PY" -c 'import sys
for name in sys.argv[1:]:
    print(name, getattr(__import__(name), "WHERE", "?"))' "$@"
"""


def ensure_env(repo: Path, parent: Path, *modules, gpus=0, **pip_env):
    """ensure_env MODULE...: its output and the interpreter it chose, with the folder each stub module came from."""
    return env_sh(repo, parent, 'ensure_env "$@"\n' + SHOW_MODULES, *modules, gpus=gpus, **pip_env)


def chosen(result) -> tuple[str, dict[str, str]]:
    lines = result.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("PY="))
    return lines[at].removeprefix("PY="), dict(line.split(" ", 1) for line in lines[at + 1:])


def test_python3_that_has_everything_is_used_as_it_is(tmp_path, repo):
    parent = make_parent(tmp_path)
    result = ensure_env(repo, parent, "torch", "numpy", "scipy")
    assert result.returncode == 0 and result.stderr == ""
    python, where = chosen(result)
    assert python == "python3" and not (repo / ".venv").exists()
    assert where == {"torch": str(purelib(parent / "bin" / "python") / "torch"), "numpy": where["numpy"],
                     "scipy": str(tmp_path / "elsewhere" / "scipy")}


def test_what_is_missing_goes_into_a_venv_that_sees_python3s_packages(tmp_path, repo):
    parent = make_parent(tmp_path)
    wheels = tmp_path / "wheels"
    wheel(wheels, "tiktoken", "0.7.0")
    wheel(wheels, "torch", "2.13.0")  # there to be taken, and must not be
    result = ensure_env(repo, parent, "torch", "numpy", "scipy", "tiktoken", PIP_FIND_LINKS=str(wheels))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "installing into .venv: tiktoken>=0.7" in result.stdout.splitlines()
    python, where = chosen(result)
    venv_site, parent_site = purelib(repo / ".venv" / "bin" / "python"), purelib(parent / "bin" / "python")
    assert python == str(repo / ".venv" / "bin" / "python")
    assert where == {"torch": str(parent_site / "torch"), "numpy": str(parent_site / "numpy"),
                     "scipy": str(tmp_path / "elsewhere" / "scipy"), "tiktoken": str(venv_site / "tiktoken")}
    assert not (venv_site / "torch").exists()
    assert (repo / ".venv" / "pins.txt").read_text() == "torch==2.11.0\n"  # pip could not have replaced it

    again = ensure_env(repo, parent, "torch", "tiktoken")  # the .venv made before serves as it is
    assert again.returncode == 0 and again.stderr == "" and "installing" not in again.stdout
    assert chosen(again) == (python, {"torch": where["torch"], "tiktoken": where["tiktoken"]})


@pytest.mark.parametrize("index", ["none", "unreachable"])
def test_offline_what_is_missing_is_named_in_one_line_with_the_command(tmp_path, repo, index):
    """No index (PIP_NO_INDEX), or one that refuses the connection: pip gives up at once, without retries."""
    parent = make_parent(tmp_path)
    pip_env = {"PIP_NO_INDEX": "1"} if index == "none" else {"PIP_NO_INDEX": "", "PIP_INDEX_URL": "http://127.0.0.1:9/"}
    result = ensure_env(repo, parent, "torch", "tiktoken", "huggingface_hub", **pip_env)
    assert result.returncode == 1
    python = repo / ".venv" / "bin" / "python"
    assert result.stderr == (f"error: missing tiktoken, huggingface_hub, which pip could not install (no package "
                             f"index? its output: .venv/pip.log); install with: {python} -m pip install "
                             "'tiktoken>=0.7' 'huggingface_hub>=1.0'\n")
    assert "tiktoken" in (repo / ".venv" / "pip.log").read_text()


def requirements() -> dict[str, str]:
    """requirements.txt's lines by package name."""
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    return {re.match(r"[\w-]+", line).group(): line for line in lines}


@pytest.mark.parametrize("gpus, spec", [(0, "torch==2.13.0"), (1, requirements()["torch"])])
def test_missing_torch_is_the_cpu_build_without_a_gpu_and_requirements_txts_with_one(tmp_path, repo, gpus, spec):
    """Without a GPU the CPU build; with one, requirements.txt's range, whose newest release is the newest tested."""
    assert re.fullmatch(r"torch>=2\.11\.0,<=\d+\.\d+\.\d+", requirements()["torch"])
    parent = make_parent(tmp_path, with_torch=False)
    result = ensure_env(repo, parent, "torch", "numpy", gpus=gpus)
    assert result.returncode == 1
    assert result.stderr.endswith(f" -m pip install '{spec}'\n") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("version, outside", [("2.10.0", True), ("2.11.0", False), ("2.15.0+cu132", False),
                                              ("2.16.0", True)])
def test_a_torch_outside_the_tested_range_is_used_as_it_is_with_one_warning(tmp_path, repo, version, outside):
    parent = make_parent(tmp_path, torch_version=version)
    result = ensure_env(repo, parent, "torch", "numpy")
    assert result.returncode == 0 and chosen(result)[0] == "python3"
    low, high = re.fullmatch(r"torch>=(.+),<=(.+)", requirements()["torch"]).groups()
    warning = (f"warning: torch {version} is outside the range this trainer is tested on, {low} to {high} "
               "(requirements.txt); it is used as it is\n")
    assert result.stderr == (warning if outside else "")


def stand_in_index(folder: Path, torch_version: str) -> Path:
    """Wheels of stub packages for torch_version and every other line of requirements.txt, at its lowest version."""
    for name, line in requirements().items():
        wheel(folder, name, torch_version if name == "torch" else re.search(r">=([\d.]+)", line).group(1))
    return folder


def test_torch_env_makes_a_kept_environment_of_that_torch_and_requirements_txt(tmp_path, repo):
    parent = make_parent(tmp_path)
    index = {"PIP_FIND_LINKS": str(stand_in_index(tmp_path / "wheels", "2.99.0")), "TORCH_ENVS": str(tmp_path / "envs")}
    made = env_sh(repo, parent, 'torch_env "$1"\n' + SHOW_MODULES.replace('"$@"', "torch numpy pytest"), "2.99.0",
                  **index)
    assert made.returncode == 0, made.stderr
    folder = tmp_path / "envs" / "torch-2.99.0"
    assert made.stdout.splitlines()[0] == f"making the environment of torch 2.99.0 in {folder} (about 4 GB the first time)"
    python, where = chosen(made)
    assert python == str(folder / "bin" / "python") and (folder / "ready").exists()
    assert all(where[name].startswith(str(purelib(folder / "bin" / "python"))) for name in ("torch", "numpy", "pytest"))

    again = env_sh(repo, parent, 'torch_env "$1"\necho "PY=$PY"', "2.99.0", **index)
    assert again.returncode == 0 and again.stdout == f"PY={python}\n"  # kept: nothing made or installed


def test_torch_env_that_pip_cannot_make_is_named_with_pips_log_and_not_kept(tmp_path, repo):
    parent = make_parent(tmp_path)
    index = {"PIP_FIND_LINKS": str(stand_in_index(tmp_path / "wheels", "2.99.0")), "TORCH_ENVS": str(tmp_path / "envs")}
    failed = env_sh(repo, parent, 'torch_env "$1"', "2.98.0", **index)
    folder = tmp_path / "envs" / "torch-2.98.0"
    assert failed.returncode == 1
    assert failed.stderr == (f"error: pip could not install torch==2.98.0 and requirements.txt into {folder} "
                             f"(its output: {folder}.log)\n")
    assert "torch==2.98.0" in Path(f"{folder}.log").read_text() and not (folder / "ready").exists()
