"""What a wheel installs: one import package, ``icm``, safe next to a user's own data.py / dpo.py / cli.py."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from conftest import ROOT


def test_wheel_installs_one_package_that_user_modules_cannot_shadow(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("icm_dpo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"icm"}
    assert {"icm/cli.py", "icm/data/tasks.py", "icm/dpo/training.py", "icm/data/builtin/amazon_cells_labelled.txt",
            "icm/data/builtin/capitals.txt", "icm/__main__.py"} <= set(names)

    # A clean venv that borrows this one's dependencies (a path line in a .pth, so none of this venv's own .pth
    # hooks run: the editable install of the checkout stays out of it).
    env_dir = tmp_path / "clean"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True)

    user = tmp_path / "project"
    user.mkdir()
    for name in ("data", "dpo", "cli"):  # a user's own modules with the repository's folder names
        (user / f"{name}.py").write_text(f"raise ImportError('the user module {name}.py was imported')\n")
    probe = ("import icm.cli, icm.data.tasks as tasks, icm.dpo.training; "
             "print(tasks.__file__); print(len(tasks.get_task('sentiment').questions(3, 0)))")
    result = subprocess.run([str(python), "-c", probe], cwd=user, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    path, count = result.stdout.split()
    assert Path(path).is_relative_to(env_dir) and count == "3"
    version = subprocess.run([str(python), "-m", "icm", "--version"], cwd=user, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("icm "), version.stderr


def test_the_quick_start_evaluates_on_other_questions_than_it_trains_on():
    """README's stage-by-stage quick start: the eval questions (task, --limit, --seed) are not among the generated
    ones, and the base model is evaluated as well as the policy."""
    import re

    from icm.data.tasks import get_task

    text = (Path(__file__).parents[1] / "README.md").read_text()
    quick = text.split("## Quick start")[1].split("## ")[0]
    generate = re.search(r"icm generate --task (\w+) --limit (\d+)", quick)
    evals = re.findall(r"icm eval --task (\w+) --limit (\d+) --seed (\d+) -m (\S+)", quick)
    assert generate and len(evals) == 2 and {e[3] for e in evals} == {"smollm2-135m", "runs/policy"}
    task = get_task(generate.group(1))
    trained = {q.question for q in task.questions(int(generate.group(2)), 0)}
    for name, limit, seed, _ in evals:
        assert name == generate.group(1)
        assert not trained & {q.question for q in get_task(name).questions(int(limit), int(seed))}
