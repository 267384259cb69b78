"""`doctor` reports versions against the lock, the device, bitsandbytes, Unsloth, disk and the plan."""
import subprocess
import sys


def test_doctor_reports_every_check():
    result = subprocess.run([sys.executable, "-m", "fasttune", "doctor"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for package in ("torch", "transformers", "trl", "peft", "bitsandbytes", "gguf"):
        assert package in out
    assert "bitsandbytes backend" in out and "Unsloth" in out and "GB free in" in out
    assert "a run here would use backend" in out and "dtype" in out and "attention" in out


def test_versions_are_compared_with_the_lock():
    from fasttune.doctor import tested_versions

    pins = tested_versions()
    assert pins["torch"] == "2.13.0" and pins["transformers"] == "5.17.0" and pins["trl"] == "1.14.2"
