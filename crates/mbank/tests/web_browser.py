"""The web console in a real browser: Debian's headless Chromium driven by Selenium
(python3-selenium, chromium-driver), run by crates/mbank/tests/web.rs against
`mbank serve` on loopback.

    web_browser.py URL SCREENSHOT_DIR

Users come from the environment: MBANK_WEB_USER/PASS (alice, owner of alice/dev with
two versions), MBANK_WEB_ADMIN/ADMIN_PASS. The server's certificate is from a test CA
the browser does not know, so certificate errors are accepted (loopback only).
Exits non-zero, saying which step failed, on any failed check or any error in the
browser's console on a page that should load.
"""

import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

URL, SHOTS = sys.argv[1].rstrip("/"), sys.argv[2]
os.makedirs(SHOTS, exist_ok=True)

opts = webdriver.ChromeOptions()
opts.binary_location = "/usr/bin/chromium"
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1280,900"]:
    opts.add_argument(a)
opts.set_capability("acceptInsecureCerts", True)
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
driver.implicitly_wait(5)


def fail(step, why):
    driver.save_screenshot(os.path.join(SHOTS, f"failed-{step}.png"))
    print(f"web_browser: {step}: {why}", file=sys.stderr)
    driver.quit()
    sys.exit(1)


def check(step, ok, why):
    if not ok:
        fail(step, why)


def click(element):
    """Clicks a link or a form's button and waits for the next page to replace this one
    (a click does not wait for the navigation it starts)."""
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 30).until(lambda _: gone(old))


def gone(element):
    """True once `element` left the document. Chromium says so either as a stale
    element or, while the next page replaces it, as a node that "does not belong to
    the document"."""
    try:
        element.is_enabled()
        return False
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        if "does not belong to the document" in str(e):
            return True
        raise


def page(step, errors_allowed=False):
    """Saves a screenshot of the page and checks the browser's console."""
    driver.save_screenshot(os.path.join(SHOTS, f"{step}.png"))
    logs = driver.get_log("browser")
    bad = [l for l in logs if l.get("level") in ("SEVERE", "WARNING")]
    if bad and not errors_allowed:
        fail(step, f"the browser's console has errors: {bad}")


def login(step, user, password):
    driver.get(URL + "/login")
    page(step + "-form")
    driver.find_element(By.NAME, "user").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    click(driver.find_element(By.CSS_SELECTOR, "form button[type=submit]"))
    check(step, driver.current_url == URL + "/", f"login ended at {driver.current_url}")


def logout(step):
    click(driver.find_element(By.CSS_SELECTOR, "header form button"))
    check(step, driver.current_url.endswith("/login"), f"logout ended at {driver.current_url}")


user, password = os.environ["MBANK_WEB_USER"], os.environ["MBANK_WEB_PASS"]
admin, admin_pass = os.environ["MBANK_WEB_ADMIN"], os.environ["MBANK_WEB_ADMIN_PASS"]

# A user logs in and sees their machines.
login("01-login", user, password)
page("02-machines")
table = driver.find_element(By.ID, "machines").text
check("02-machines", f"{user}/dev" in table, f"{user}/dev not in {table!r}")

# The history; make the older version the head.
click(driver.find_element(By.LINK_TEXT, f"{user}/dev"))
page("03-history")
items = driver.find_elements(By.CSS_SELECTOR, "#versions li.version")
check("03-history", len(items) == 2, f"{len(items)} versions shown, expected 2")
older = [li for li in items if "head" not in li.get_attribute("class").split()]
check("03-history", len(older) == 1, "expected one version that is not the head")
vid = older[0].get_attribute("id")
click(older[0].find_element(By.NAME, "set-head"))
page("04-head-set")
li = driver.find_element(By.ID, vid)
check("04-head-set", "head" in li.get_attribute("class").split(), f"{vid} is not the head")
check("04-head-set", driver.find_element(By.ID, "head").text == vid[2:14],
      f"the head shown is {driver.find_element(By.ID, 'head').text}")

# Remove the version that is no longer the head.
other = [li for li in driver.find_elements(By.CSS_SELECTOR, "#versions li.version")
         if li.get_attribute("id") != vid]
click(other[0].find_element(By.NAME, "remove"))
page("05-removed")
left = driver.find_elements(By.CSS_SELECTOR, "#versions li.version")
check("05-removed", [l.get_attribute("id") for l in left] == [vid], "the removed version is still shown")

# Fork the remaining version into a new machine from the history's form.
form = driver.find_element(By.CSS_SELECTOR, f"#{vid} form.fork")
form.find_element(By.NAME, "name").send_keys("forked")
click(form.find_element(By.NAME, "fork"))
page("05b-forked")
check("05b-forked", driver.current_url == URL + f"/machines/{user}/forked",
      f"the fork ended at {driver.current_url}")
check("05b-forked", len(driver.find_elements(By.CSS_SELECTOR, "#versions li.version")) == 1,
      "the fork has not one version")
check("05b-forked", f"/machines/{user}/dev#{vid}" in
      driver.find_element(By.CSS_SELECTOR, "a.forked").get_attribute("href"),
      "the fork does not link to its source")

# A form posted without its CSRF token is refused (the field removed in the page).
driver.get(URL + f"/machines/{user}/dev")
driver.execute_script(
    "document.querySelectorAll('#versions input[name=csrf]').forEach(e => e.remove())")
form = driver.find_element(By.CSS_SELECTOR, f"#{vid} form.fork")
form.find_element(By.NAME, "name").send_keys("nocsrf")
click(form.find_element(By.NAME, "fork"))
page("05c-no-csrf", errors_allowed=True)
check("05c-no-csrf", "403" in driver.find_element(By.TAG_NAME, "h1").text,
      "a form without its CSRF token was not refused")

# Another user's machine: the page of an absent one.
driver.get(URL + "/machines/bob/secret")
page("06-other-users-machine", errors_allowed=True)
check("06-other-users-machine", "404" in driver.find_element(By.TAG_NAME, "h1").text,
      "bob/secret did not answer 404")

driver.get(URL + "/tokens")
page("07-tokens")
check("07-tokens", "this session" in driver.find_element(By.ID, "tokens").text,
      "the session's token is not listed")
logout("08-logout")

# An administrator adds a user with a quota, who then logs in.
login("09-admin-login", admin, admin_pass)
click(driver.find_element(By.LINK_TEXT, "Users"))
page("10-users")
form = driver.find_element(By.ID, "add-user")
form.find_element(By.NAME, "name").send_keys("carol")
form.find_element(By.NAME, "password").send_keys("carol-secret-4444")
form.find_element(By.NAME, "quota_gib").send_keys("1")
click(form.find_element(By.CSS_SELECTOR, "button[type=submit]"))
page("11-user-added")
check("11-user-added", "carol" in driver.find_element(By.ID, "users").text, "carol not listed")
for step, name in [("11b-published", "Published"), ("11c-storage", "Storage"),
                   ("11d-sessions", "Sessions"), ("11e-health", "Health")]:
    click(driver.find_element(By.LINK_TEXT, name))
    page(step)
check("11e-health", len(driver.find_elements(By.CSS_SELECTOR, "figure.chart svg")) >= 4,
      "the health page has no charts")

# A verify started from the storage page, followed by reloading (no script) to its end.
click(driver.find_element(By.LINK_TEXT, "Storage"))
click(driver.find_element(By.NAME, "start-verify"))
page("11f-verify-started")
driver.implicitly_wait(0)
for _ in range(480):  # up to two minutes
    if driver.find_elements(By.NAME, "start-verify"):
        break
    time.sleep(0.25)
    reload = driver.find_elements(By.LINK_TEXT, "reload the page")
    if reload:
        click(reload[0])
    else:
        driver.get(URL + "/admin/storage")
driver.implicitly_wait(5)
page("11g-verify-done")
check("11g-verify-done", "no damage" in driver.find_element(By.ID, "jobs").text,
      "the verify started from the storage page did not end with no damage")
logout("12-admin-logout")
login("13-new-user-login", "carol", "carol-secret-4444")
page("14-new-user-machines")
check("14-new-user-machines", "of 1.0 GiB" in driver.find_element(By.ID, "usage").text,
      "carol's quota is not shown")

driver.quit()
print(f"web_browser: every step passed; screenshots in {SHOTS}")
