//! A small W3C WebDriver client for the browser tests: Debian's chromium,
//! headless, driven through chromedriver over HTTP (both installed by
//! scripts/install-tools.sh). Waits are JavaScript conditions polled until
//! true, so a test states what the page must show, not how long to sleep.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The browser and driver programs: `KALON_CHROMIUM` / `KALON_CHROMEDRIVER`,
/// else Debian's.
fn programs() -> (PathBuf, PathBuf) {
    let pick = |var: &str, default: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default))
    };
    let browser = pick("KALON_CHROMIUM", "/usr/bin/chromium");
    let driver = pick("KALON_CHROMEDRIVER", "/usr/bin/chromedriver");
    for program in [&browser, &driver] {
        assert!(
            program.exists(),
            "{} missing: run `bash scripts/install-tools.sh` (Debian's chromium and chromium-driver)",
            program.display()
        );
    }
    (browser, driver)
}

/// A headless chromium session. Dropping it ends the driver (and so the
/// browser).
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        let (browser, driver) = programs();
        let port = crate::free_port();
        let driver = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = match http.get(format!("{base}/status")).send().await {
                Ok(r) => serde_json::from_slice::<Value>(&r.bytes().await.unwrap_or_default())
                    .map(|v| v["value"]["ready"] == json!(true))
                    .unwrap_or(false),
                Err(_) => false,
            };
            if ready {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "chromedriver did not answer on port {port} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": browser,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1440,1000", "--no-first-run", "--no-default-browser-check",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        } } });
        let answer = post(&http, &format!("{base}/session"), &capabilities).await;
        let session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_owned();
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            driver,
            _profile: profile,
        }
    }

    pub async fn goto(&self, url: &str) {
        post(
            &self.http,
            &format!("{}/url", self.session),
            &json!({ "url": url }),
        )
        .await;
    }

    /// The first element matching a CSS selector.
    pub async fn find(&self, css: &str) -> String {
        let answer = post(
            &self.http,
            &format!("{}/element", self.session),
            &json!({ "using": "css selector", "value": css }),
        )
        .await;
        answer[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {answer}"))
            .to_owned()
    }

    pub async fn click(&self, css: &str) {
        let element = self.find(css).await;
        post(
            &self.http,
            &format!("{}/element/{element}/click", self.session),
            &json!({}),
        )
        .await;
    }

    /// Clears a field and types `text` into it, as a person would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        post(
            &self.http,
            &format!("{}/element/{element}/clear", self.session),
            &json!({}),
        )
        .await;
        post(
            &self.http,
            &format!("{}/element/{element}/value", self.session),
            &json!({ "text": text }),
        )
        .await;
    }

    /// The rendered text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let element = self.find(css).await;
        let answer = get(
            &self.http,
            &format!("{}/element/{element}/text", self.session),
        )
        .await;
        answer.as_str().unwrap_or_default().to_owned()
    }

    /// Runs `script` (a function body; `return` its value) in the page.
    pub async fn script(&self, script: &str) -> Value {
        post(
            &self.http,
            &format!("{}/execute/sync", self.session),
            &json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Polls `condition` (a JavaScript expression) until it is true; panics
    /// after `timeout` with `what` and the page's text.
    pub async fn wait_until(&self, condition: &str, timeout: Duration, what: &str) {
        let started = Instant::now();
        loop {
            let value = self
                .script(&format!(
                    "try {{ return !!({condition}); }} catch (e) {{ return false; }}"
                ))
                .await;
            if value == json!(true) {
                return;
            }
            if started.elapsed() > timeout {
                let page = self.script("return document.body.innerText").await;
                panic!(
                    "{what}: not within {timeout:?} ({condition})\npage:\n{}",
                    page.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Saves a PNG of the window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let answer = get(&self.http, &format!("{}/screenshot", self.session)).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(answer.as_str().expect("a screenshot"))
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session and the driver.
    pub async fn close(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill().await;
    }
}

async fn post(http: &reqwest::Client, url: &str, body: &Value) -> Value {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap_or_else(|e| panic!("WebDriver {url}: {e}"));
    answer(url, response).await
}

async fn get(http: &reqwest::Client, url: &str) -> Value {
    let response = http
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("WebDriver {url}: {e}"));
    answer(url, response).await
}

async fn answer(url: &str, response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value =
        serde_json::from_slice(&response.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
    assert!(
        status.is_success(),
        "WebDriver {url} answered {status}: {body}"
    );
    body["value"].clone()
}
