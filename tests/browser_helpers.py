"""Helpers for the browser tests: Debian's Chromium and chromedriver (installed with apt when missing
and we are root), a headless selenium driver that never downloads anything, and the artifacts folder.

Selenium is told where both binaries are, so its driver manager stays idle; the network here is
closed, hence the flags that keep Chromium from calling home.
"""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def ensure_chromium():
    """None when Chromium and chromedriver are there (installing them with apt if need be), else why not."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return None
    if os.geteuid() != 0:
        return (f"{CHROMIUM} or {CHROMEDRIVER} is missing, and only root may install them "
                "(apt-get install chromium chromium-driver)")
    if shutil.which("apt-get") is None:
        return f"{CHROMIUM} or {CHROMEDRIVER} is missing, and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt_get(*args):
        return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=600)

    try:
        result = apt_get("install", "-y", "chromium", "chromium-driver")
        if result.returncode != 0:  # a fresh machine may not have package lists yet
            apt_get("update")
            result = apt_get("install", "-y", "chromium", "chromium-driver")
    except subprocess.TimeoutExpired:
        return "apt-get took more than 600 s to install chromium chromium-driver"
    if result.returncode != 0 or not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        return f"apt-get install chromium chromium-driver failed ({result.returncode}): {result.stderr[-500:]}"
    return None


def make_driver(user_data_dir, width=1200, height=900):
    """A headless Chromium under selenium, with a fresh profile in user_data_dir."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_window_size(width, height)
    return driver


def artifacts_dir():
    """Where screenshots go: $REFIMPL_ARTIFACTS, or test-artifacts/ in the repository."""
    path = Path(os.environ.get("REFIMPL_ARTIFACTS") or ROOT / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path
