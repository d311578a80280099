"""Metrics shared between processes through ``<data_dir>/metrics``.

Each case runs in a fresh interpreter: multiprocess mode must be chosen before a process creates
its first metric, which this test process did long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def run(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done


def test_processes_write_to_data_dir_and_one_scrape_sums_them(tmp_path: Path) -> None:
    stale = tmp_path / "metrics" / "histogram_oldhost-1.db"
    stale.parent.mkdir()
    stale.write_bytes(b"left by a previous run")
    def writer(clean: bool) -> str:
        return f"""
            from pathlib import Path
            from node import multiprocess_metrics
            print(multiprocess_metrics.enable(Path({str(tmp_path)!r}), clean={clean}))
            from node import metrics
            metrics.JOB_DURATION.observe(2.5)
            metrics.DELIVERY_DURATION.labels(outcome="delivered").observe(0.25)
        """

    assert run(writer(clean=True)).stdout.strip() == str(tmp_path / "metrics")
    assert not stale.exists()  # a start that owns every writer empties the directory
    run(writer(clean=False))

    files = sorted(p.name for p in (tmp_path / "metrics").glob("*.db"))
    assert len(files) == 4, files  # a counter and a histogram file per process, by host and PID
    assert all(name.count("_") == 1 for name in files), files

    scrape = run(f"""
        import os
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path / "metrics")!r}
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        print(generate_latest(registry).decode())
    """).stdout
    assert "mednode_job_duration_seconds_count 2.0" in scrape
    assert "mednode_job_duration_seconds_sum 5.0" in scrape
    assert 'mednode_delivery_duration_seconds_count{outcome="delivered"} 2.0' in scrape


def test_a_process_whose_metrics_exist_already_stays_on_its_own(tmp_path: Path) -> None:
    done = run(f"""
        import os
        from pathlib import Path
        from node import metrics, multiprocess_metrics
        print(multiprocess_metrics.enable(Path({str(tmp_path)!r}), clean=True))
        print(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    """)
    assert done.stdout.split() == ["None", "None"]
    assert not (tmp_path / "metrics").exists()
