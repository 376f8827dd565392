"""The installers' page in a real browser: Debian's headless Chromium driven over WebDriver
(selenium, pinned), as an installer and as a signed-in user who is not one.

Environment: PAGE_URL; INSTALLER_USER, INSTALLER_PASSWORD (temporary), INSTALLER_NEW_PASSWORD;
VISITOR_USER, VISITOR_PASSWORD (temporary), VISITOR_NEW_PASSWORD; SERIAL (allowed);
SECOND_SERIAL (allowed, past the installer's quota); SCAN_SERIAL (on the label the camera sees);
DOWNLOAD_DIR; SCREENSHOT_DIR; CHROMIUM, CHROMEDRIVER (default /usr/bin/...).

The camera is Chromium's fake capture device playing a video this script draws (python-barcode
for the Code 128s, segno for the QR code, both pinned): first a QR code with a web address only,
then a device label as a phone held upright sees it lying flat: the serial's Code 128 on end, a
firmware version's Code 128 across, and that QR code.

Prints one JSON object: what the page showed at each step, what it stored, what it downloaded.
Every wait is bounded (WebDriverWait); a step that does not come fails the run.
"""

import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import tempfile
import time

import segno
from barcode import Code128
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as visible
from selenium.webdriver.support.ui import WebDriverWait

WAIT = 20


def totp(secret):
    """RFC 6238 (SHA-1, 6 digits, 30 s): what an authenticator app shows for `secret`.

    moto accepts only the current 30-second step's code; one read in a step's last seconds
    could reach it in the next. So within 3 s of a step's end, this waits (at most those 3 s)
    for the next step to begin, as a person would wait for a fresh code.
    """
    left = 30 - time.time() % 30
    if left < 3:
        time.sleep(left)
    key = base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))
    counter = struct.pack(">Q", int(time.time()) // 30)
    digest = hmac.new(key, counter, hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    code = (struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF) % 1_000_000
    return f"{code:06d}"


LABEL_URL = "https://example.com/manuals/sensor-x"
LABEL_FIRMWARE = "FW 1.2.3"  # not a serial: a space
WIDTH, HEIGHT, FPS = 640, 480, 5
WHITE, BLACK = 235, 16  # video luma range


def label_video(path, serial):
    """A YUV4MPEG2 file: 6 s of a QR code alone (not a serial), then 2 s of the label."""

    def code128(text):
        return [int(b) for b in Code128(text).build()[0]]

    def frame(with_serial):
        luma = bytearray([WHITE]) * (WIDTH * HEIGHT)

        def paint(x0, y0, modules, scale):
            for row, bits in enumerate(modules):
                for col, bit in enumerate(bits):
                    if bit:
                        for y in range(y0 + row * scale, y0 + (row + 1) * scale):
                            start = y * WIDTH + x0 + col * scale
                            luma[start : start + scale] = bytes([BLACK]) * scale

        qr = segno.make(LABEL_URL, error="m", micro=False).matrix
        paint(330, 220, qr, 5)
        if with_serial:
            firmware = code128(LABEL_FIRMWARE)
            paint(WIDTH - 40 - len(firmware) * 3, 40, [firmware] * 40, 3)
            on_end = [[bar] * 20 for bar in code128(serial)]  # one row per module, 20 wide
            paint(60, 150, on_end, 3)
        chroma = bytes([128]) * (WIDTH * HEIGHT // 4)
        return b"FRAME\n" + bytes(luma) + chroma + chroma

    with open(path, "wb") as out:
        out.write(f"YUV4MPEG2 W{WIDTH} H{HEIGHT} F{FPS}:1 Ip A1:1 C420jpeg\n".encode())
        alone, label = frame(False), frame(True)
        out.write(alone * (6 * FPS) + label * (2 * FPS))


class Page:
    def __init__(self, driver, shots):
        self.driver = driver
        self.shots = shots
        self.wait = WebDriverWait(driver, WAIT)

    def step(self, element_id):
        return self.wait.until(visible.visibility_of_element_located((By.ID, element_id)))

    def fill(self, element_id, text):
        field = self.step(element_id)
        field.clear()
        field.send_keys(text)

    def submit(self, form_id):
        self.driver.find_element(By.ID, form_id).find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    def text(self, element_id):
        return self.driver.find_element(By.ID, element_id).text

    def message(self):
        box = self.step("message")
        return box.text

    def script(self, code):
        return self.driver.execute_script(code)

    def shot(self, name):
        self.driver.save_screenshot(os.path.join(self.shots, f"{name}.png"))

    def first_sign_in(self, user, temporary, new, shot_prefix=None):
        """Temporary password, new password, authenticator set-up: to the claim form."""
        self.step("sign-in")
        self.fill("username", user)
        self.fill("password", temporary)
        if shot_prefix:
            self.shot(f"{shot_prefix}1-sign-in")
        self.submit("sign-in")
        self.step("new-password")
        self.fill("new-password-value", new)
        if shot_prefix:
            self.shot(f"{shot_prefix}2-new-password")
        self.submit("new-password")
        self.step("mfa-setup")
        secret = self.wait.until(lambda d: d.find_element(By.ID, "mfa-secret").text)
        uri = self.text("mfa-uri")
        if shot_prefix:
            self.shot(f"{shot_prefix}3-authenticator-setup")
        self.fill("mfa-setup-code", totp(secret))
        self.submit("mfa-setup")
        self.step("claim")
        return secret, uri

    def sign_out(self):
        """Signs out and returns what the page said once Cognito answered its RevokeToken."""
        self.driver.find_element(By.ID, "sign-out").click()
        self.step("sign-in")
        self.wait.until(lambda d: "Signed out" in self.message())
        return self.message()


def downloaded(directory, names):
    """The files once Chromium has finished writing them (no `.crdownload` left), bounded."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        present = set(os.listdir(directory))
        if all(n in present for n in names) and not any(p.endswith(".crdownload") for p in present):
            return {n: open(os.path.join(directory, n)).read() for n in names}
        time.sleep(0.1)
    raise SystemExit(f"downloads did not arrive: {sorted(os.listdir(directory))}")


def storage(driver):
    """Everything the page could have stored: Web Storage, cookies, IndexedDB, caches."""
    return driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        (async () => {
          const dbs = indexedDB.databases ? await indexedDB.databases() : [];
          const caches_ = self.caches ? await caches.keys() : [];
          done({local: localStorage.length, session: sessionStorage.length,
                cookies: document.cookie, indexedDb: dbs.length, caches: caches_.length});
        })();
        """
    )


def main():
    env = os.environ
    profile = tempfile.mkdtemp(prefix="chromium-")
    camera = os.path.join(profile, "label.y4m")
    label_video(camera, env["SCAN_SERIAL"])
    options = webdriver.ChromeOptions()
    options.binary_location = env.get("CHROMIUM", "/usr/bin/chromium")
    for flag in [
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=900,1000", f"--user-data-dir={profile}",
        # The camera: permission granted as a person would, the label video as its picture.
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-video-capture={camera}",
    ]:
        options.add_argument(flag)
    service = Service(executable_path=env.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    out = {}
    try:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": env["DOWNLOAD_DIR"]}
        )
        driver.get(env["PAGE_URL"])
        page = Page(driver, env["SCREENSHOT_DIR"])

        # The installer's first sign-in, a claim, its files.
        secret, uri = page.first_sign_in(
            env["INSTALLER_USER"], env["INSTALLER_PASSWORD"], env["INSTALLER_NEW_PASSWORD"], "1"
        )
        out["mfaUri"] = uri
        page.shot("14-claim-form")
        page.fill("serial", env["SERIAL"])
        page.submit("claim")
        page.step("result")
        out["countdown"] = page.text("countdown")
        out["command"] = page.text("command")
        out["resultSerial"] = page.text("result-serial")
        page.shot("15-claim-issued")
        # The command goes to the clipboard as shown (the browser's clipboard permission granted,
        # as a person's click does).
        driver.execute_cdp_cmd(
            "Browser.grantPermissions",
            {"origin": env["PAGE_URL"].rstrip("/"), "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
        )
        driver.find_element(By.ID, "copy-command").click()
        out["copied"] = page.message()
        out["clipboard"] = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.clipboard.readText().then(done, (e) => done('unreadable: ' + e));"
        )
        # As on an installer's phone.
        driver.set_window_size(390, 844)
        page.shot("15p-claim-issued-phone")
        driver.set_window_size(900, 1000)
        driver.find_element(By.ID, "download-cert").click()
        driver.find_element(By.ID, "download-key").click()
        out["downloads"] = downloaded(env["DOWNLOAD_DIR"], ["claim.pem.crt", "claim.pem.key"])
        out["storage"] = storage(driver)

        # A serial that is not one: refused in plain words, no claim.
        driver.find_element(By.ID, "another").click()
        page.fill("serial", "not a serial!")
        page.submit("claim")
        out["badSerial"] = page.message()
        page.shot("16-refused-serial")

        # Past the installer's quota: how long to wait, from the API's Retry-After.
        page.fill("serial", env["SECOND_SERIAL"])
        page.submit("claim")
        out["rateLimited"] = page.wait.until(
            lambda d: (text := d.find_element(By.ID, "message").text) != out["badSerial"] and text
        )
        page.shot("16b-rate-limited")

        # The camera reads the serial off the label: a QR code with a web address is seen and
        # passed over, the Code 128 that matches the serial pattern fills the field.
        page.driver.find_element(By.ID, "scan").click()
        page.step("scanner")
        status = "return document.getElementById('scan-status').textContent"
        fast = WebDriverWait(driver, WAIT, poll_frequency=0.1)
        out["scanOther"] = fast.until(
            lambda d: "not a device serial" in (text := page.script(status)) and text
        )
        page.shot("16c-scanning")
        fast.until(lambda d: d.find_element(By.ID, "serial").get_attribute("value") == env["SCAN_SERIAL"])
        out["scanned"] = page.message()
        out["scanAfter"] = page.script(
            "const v = document.getElementById('scan-video');"
            "return {scannerHidden: document.getElementById('scanner').hidden,"
            " camera: v.srcObject === null ? 'released' : 'held', decoderOnPage: typeof window.ZXing};"
        )
        page.shot("16d-scanned")
        # Stopping by hand releases the camera too.
        page.driver.find_element(By.ID, "scan").click()
        page.step("scanner")
        page.driver.find_element(By.ID, "scan-stop").click()
        out["scanStopped"] = fast.until(
            lambda d: page.script(
                "return document.getElementById('scanner').hidden &&"
                " document.getElementById('scan-video').srcObject === null"
            )
        )

        # An installer who refused the browser's camera prompt is told how to allow it. (The
        # fake UI always grants, so the refusal is the browser's own DOMException, thrown.)
        page.script(
            "navigator.mediaDevices.getUserMedia = () =>"
            " Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));"
        )
        page.driver.find_element(By.ID, "scan").click()
        out["cameraBlocked"] = page.message()
        out["cameraBlockedAfter"] = page.script(
            "return document.getElementById('scanner').hidden"
            " && !document.getElementById('scan').hidden"
        )

        # Signing out revokes the refresh token; signing in again asks for the authenticator's
        # code.
        out["signedOut"] = page.sign_out()
        page.fill("username", env["INSTALLER_USER"])
        page.fill("password", env["INSTALLER_NEW_PASSWORD"])
        page.submit("sign-in")
        page.step("mfa")
        page.shot("17-authenticator-code")
        page.fill("mfa-code", totp(secret))
        page.submit("mfa")
        page.step("claim")
        out["signedInAgain"] = page.text("who")
        page.sign_out()

        # Someone signed in who is not an installer.
        page.first_sign_in(env["VISITOR_USER"], env["VISITOR_PASSWORD"], env["VISITOR_NEW_PASSWORD"])
        page.fill("serial", env["SERIAL"])
        page.submit("claim")
        out["notInstaller"] = page.message()
        page.shot("18-not-an-installer")
        out["storageAtEnd"] = storage(driver)
        out["consoleErrors"] = [
            e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"
        ]
    except Exception as error:  # what the page showed when it went wrong, for the failure
        page_text = driver.find_element(By.TAG_NAME, "body").text if driver else ""
        console = [e["message"] for e in driver.get_log("browser")] if driver else []
        driver.save_screenshot(os.path.join(env["SCREENSHOT_DIR"], "failed.png"))
        print(json.dumps({"error": repr(error), "page": page_text, "console": console}))
        sys.exit(1)
    finally:
        driver.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
