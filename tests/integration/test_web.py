"""The web form in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) against `bitplan serve`: sign in, upload the digits CNN and its data through the
form, see a validation error for a bad budget, submit, watch the progress change without a
reload, read the plan table and the frontier plot, download the JSON. Screenshots go to
docs/screenshots/ (linked from the README)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.devstack import DevStack
from tests.integration.service_client import wait_until

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"


def browser(download_dir: Path, width: int = 1280, height: int = 1000):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Debian's chromium and chromium-driver are needed (make test installs them: apt-get install chromium "
                    "chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium must not look for drivers on the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
                 "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={download_dir.parent / 'profile'}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    return driver


def wait_for(condition, timeout: float = 60, every: float = 0.1):
    return wait_until(condition, timeout, every)


def sign_in(driver, server) -> None:
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/login")
    driver.find_element(By.ID, "key").send_keys(server.key)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_for(lambda: driver.find_elements(By.ID, "job-form"))


def screenshot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, min(max(height + 40, 600), 4000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with DevStack(embedded=True, workdir=tmp_path_factory.mktemp("web")) as stack:
        stack.key = (stack.data_dir / "local-key").read_text().strip()
        yield stack


def test_sign_in_submit_watch_and_read_the_plan(server, digits_files, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = browser(downloads)
    try:
        driver.get(server.url + "/")
        assert "/login" in driver.current_url  # pages need a key
        driver.find_element(By.ID, "key").send_keys("bp_not-a-key")
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        assert "not valid" in driver.find_element(By.ID, "key-error").text
        driver.find_element(By.ID, "key").send_keys(server.key)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        wait_for(lambda: driver.find_elements(By.ID, "job-form"))
        cookie = driver.get_cookie("bitplan_session")  # a session id; the key itself never goes into a cookie
        assert cookie["httpOnly"] and driver.execute_script("return document.cookie") == ""
        assert server.key not in cookie["value"] and driver.get_cookie("bitplan_key") is None
        # defaults come from the registries
        assert driver.find_element(By.CSS_SELECTOR, "input[name=sensitivity][value=auto]").is_selected()
        assert driver.find_element(By.CSS_SELECTOR, "input[name=solver][value=ilp]").is_selected()
        screenshot(driver, "form")

        # a bad budget: the error sits next to the field, and nothing typed or uploaded is lost
        driver.find_element(By.ID, "model_file").send_keys(str(digits_files["pt2"]))
        driver.find_element(By.ID, "data_file").send_keys(str(digits_files["calib"]))
        budget = driver.find_element(By.ID, "budget_value")
        budget.clear()
        budget.send_keys("1.5")
        for bits in ("5", "6"):
            driver.find_element(By.CSS_SELECTOR, f"input[name=w_bits][value='{bits}']").click()  # untick 5 and 6
        driver.find_element(By.ID, "pins").send_keys("fc2=8")
        driver.find_element(By.ID, "submit").click()
        error = wait_for(lambda: driver.find_elements(By.ID, "budget_value-error"), timeout=120)[0]
        assert "cannot be met" in error.text and "smallest achievable is 2.09" in error.text, error.text
        assert driver.find_element(By.ID, "budget_value").get_attribute("aria-invalid") == "true"
        assert driver.find_element(By.ID, "budget_value").get_attribute("value") == "1.5"
        assert driver.find_element(By.ID, "pins").get_attribute("value") == "fc2=8"
        assert Select(driver.find_element(By.ID, "model_id")).first_selected_option.text.startswith("digits_cnn.pt2")
        assert Select(driver.find_element(By.ID, "dataset_id")).first_selected_option.text.startswith("digits_cnn_calib.npz")
        assert not driver.find_element(By.CSS_SELECTOR, "input[name=w_bits][value='5']").is_selected()
        screenshot(driver, "form-error")

        budget = driver.find_element(By.ID, "budget_value")
        budget.clear()
        budget.send_keys("3")
        # hessian_trace takes seconds here (the default, auto, about one), long enough to watch the stages change
        driver.find_element(By.CSS_SELECTOR, "input[name=sensitivity][value=hessian_trace]").click()
        driver.find_element(By.ID, "submit").click()
        wait_for(lambda: "/jobs/j_" in driver.current_url, timeout=60)
        driver.execute_script("window.__noReload = true")
        seen = []

        def progressed():
            try:
                state = driver.find_element(By.ID, "job-state").text
                label = state + " " + " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#job-stage, #job-percent"))
            except Exception:  # the fragment is being swapped
                return False
            if not seen or seen[-1] != label:
                seen.append(label)
            if len(seen) == 3 and state == "running":
                screenshot(driver, "running")
            return state in ("succeeded", "failed") or driver.find_elements(By.ID, "plan-table")

        try:
            wait_for(progressed, timeout=300, every=0.05)
        except AssertionError:
            raise AssertionError(f"seen {seen}; page: {driver.page_source[-3000:]}\n{server.log('api.log')[-3000:]}") from None
        running = [s for s in seen if s.startswith("running")]
        assert len(running) >= 2, seen  # the stage/percentage changed while we watched
        wait_for(lambda: driver.find_elements(By.ID, "plan-table"), timeout=60)
        assert driver.find_element(By.ID, "job-state").text == "succeeded"

        rows = driver.find_elements(By.CSS_SELECTOR, "#plan-table tbody tr")
        assert [r.find_element(By.TAG_NAME, "th").text for r in rows] == ["conv1", "conv2", "conv3", "fc1", "fc2"]
        assert rows[-1].find_element(By.CSS_SELECTOR, ".bits").text == "8"  # the pin held
        svg = driver.find_element(By.CSS_SELECTOR, "svg.frontier")
        assert int(svg.get_attribute("data-points")) >= 3
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.frontier circle[data-chosen]")) == 1
        quality = driver.find_element(By.CSS_SELECTOR, "table.quality").text
        # fc2 is pinned to 8 bits, so the uniform baseline (pins kept) that fits 3 average bits is 2-bit
        assert "full precision" in quality and "this plan" in quality and "uniform 2-bit" in quality
        verdict = driver.find_element(By.ID, "uniform-check").text
        assert verdict.startswith(("Beats uniform precision.", "Level with uniform precision.")) and "uniform 2-bit" in verdict
        screenshot(driver, "plan")

        driver.find_element(By.ID, "download-json").click()
        path = wait_for(lambda: next((p for p in downloads.glob("*.json")), None), timeout=30)
        plan = json.loads(path.read_text())
        assert plan["schema"] == "bitplan.plan/v1" and plan["cost"]["avg_weight_bits"] <= 3 + 1e-9
        assert plan["pins"] == {"fc2": 8}

        driver.get(server.url + "/jobs")
        listed = driver.find_element(By.CSS_SELECTOR, "table.jobs tbody tr").text
        assert "succeeded" in listed and "average weight bits ≤ 3" in listed
    finally:
        driver.quit()


def test_a_hugging_face_checkpoint_through_the_form(server, hf_files, tmp_path):
    """A zipped checkpoint and its calibration text uploaded through the form plan like any model, for the runtime
    picked on the form (vLLM: its widths and formats only)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser(tmp_path / "downloads")
    try:
        sign_in(driver, server)
        driver.find_element(By.ID, "model_file").send_keys(str(hf_files["zip"]))
        driver.find_element(By.ID, "data_file").send_keys(str(hf_files["text"]))
        seq = driver.find_element(By.ID, "seq_len")
        seq.clear()
        seq.send_keys("32")
        driver.find_element(By.CSS_SELECTOR, "input[name=sensitivity][value=hessian_trace]").click()
        Select(driver.find_element(By.ID, "target")).select_by_value("vllm")  # INT 4/8 and fp8_e4m3/nvfp4 only
        driver.find_element(By.ID, "submit").click()
        wait_for(lambda: "/jobs/j_" in driver.current_url, timeout=120)
        try:
            wait_for(lambda: driver.find_elements(By.ID, "plan-table"), timeout=300)
        except AssertionError:
            raise AssertionError(f"page: {driver.page_source[-3000:]}\n{server.log('api.log')[-3000:]}") from None
        assert driver.find_element(By.ID, "job-state").text == "succeeded"
        names = [r.find_element(By.TAG_NAME, "th").text for r in driver.find_elements(By.CSS_SELECTOR, "#plan-table tbody tr")]
        assert names[0] == "model.layers.0.self_attn.q_proj" and names[-1] == "lm_head" and len(names) == 15
        widths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#plan-table .bits")}
        formats = {e.text for e in driver.find_elements(By.CSS_SELECTOR, "#plan-table .format")}
        assert widths <= {"4", "8"} and formats <= {"fp8_e4m3", "nvfp4"}, (widths, formats)
        assert "tiny-llama.zip" in driver.page_source
        # the deploy links: every runtime's file for a checkpoint; the GGUF one downloads llama.cpp's type file
        assert {e.get_attribute("id") for e in driver.find_elements(By.CSS_SELECTOR, ".exports a")} == {
            "export-torchao", "export-compressed-tensors", "export-gguf", "export-modelopt"}
        driver.find_element(By.ID, "export-gguf").click()
        path = wait_for(lambda: next(iter((tmp_path / "downloads").glob("*.gguf-types.txt")), None), timeout=30)
        lines = path.read_text().split()
        assert len(lines) == 15 and lines[-1].startswith("^output\\.weight$=")
    finally:
        driver.quit()

def test_narrow_screen_and_keyboard(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser(tmp_path / "dl", width=390, height=844)
    try:
        driver.get(server.url + "/login")
        key = driver.find_element(By.ID, "key")
        assert driver.switch_to.active_element == key  # focus starts in the only field
        key.send_keys(server.key + Keys.ENTER)  # sign in by keyboard alone
        wait_for(lambda: driver.find_elements(By.ID, "job-form"))
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"the form is {overflow}px wider than a phone screen"
        for element in driver.find_elements(By.CSS_SELECTOR, "#job-form input, #job-form select, #job-form textarea"):
            kind, ident = element.get_attribute("type"), element.get_attribute("id")
            if kind == "hidden":  # the CSRF token
                continue
            if kind in ("radio", "checkbox"):
                assert element.find_element(By.XPATH, "ancestor::label"), element.get_attribute("name")
            else:
                assert driver.find_elements(By.CSS_SELECTOR, f"label[for='{ident}']"), ident
        screenshot(driver, "form-narrow")
    finally:
        driver.quit()


def test_sign_out_ends_the_session_even_for_a_copied_cookie(server, tmp_path):
    from selenium.webdriver.common.by import By

    def replay(cookie) -> None:
        driver.delete_all_cookies()
        driver.add_cookie({k: cookie[k] for k in ("name", "value", "path", "httpOnly", "sameSite") if k in cookie})
        driver.get(server.url + "/jobs")

    driver = browser(tmp_path / "dl")
    try:
        sign_in(driver, server)
        copied = driver.get_cookie("bitplan_session")
        replay(copied)  # while the session lives, the copied cookie alone signs in
        assert driver.current_url.endswith("/jobs") and driver.find_elements(By.CSS_SELECTOR, "form.signout")

        driver.find_element(By.CSS_SELECTOR, "form.signout button[type=submit]").click()
        wait_for(lambda: "/login" in driver.current_url and driver.find_elements(By.ID, "key"))
        assert driver.get_cookie("bitplan_session") is None
        replay(copied)  # after signing out it does not
        assert "/login" in driver.current_url, driver.current_url
        assert driver.find_elements(By.ID, "key") and not driver.find_elements(By.CSS_SELECTOR, "form.signout")
    finally:
        driver.quit()
