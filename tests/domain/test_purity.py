"""The core stays pure: importing it loads no adapter."""

import subprocess
import sys


def test_domain_imports_no_adapter() -> None:
    code = (
        "import sys, meter.domain, meter.report\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'faust', 'aiokafka', 'prometheus_client', 'mode', 'kafka'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
