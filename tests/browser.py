"""Headless Chromium over the DevTools protocol on a pipe (`--remote-debugging-pipe`): the standard library only.

`Chromium().open(url)` loads a page, waits for it and for MathJax, and returns a `Page` whose `evaluate` runs
JavaScript in it and whose `screenshot` writes a PNG; the network requests it made are in `page.requests`."""
import base64, fcntl, json, os, shutil, subprocess, tempfile, time


def chromium_path() -> str | None: return shutil.which('chromium') or shutil.which('chromium-browser')


class Chromium:
    def __init__(self, exe: str | None = None, timeout: float = 60):
        self.timeout, self._id, self._events = timeout, 0, []
        self._profile = tempfile.mkdtemp(prefix='fxo-chromium-')
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()

        def wire():  # the protocol pipe is fds 3 (commands in) and 4 (replies out) of the browser
            cmd, rep = fcntl.fcntl(to_chrome, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome, fcntl.F_DUPFD, 10)
            os.dup2(cmd, 3); os.dup2(rep, 4)

        args = [exe or chromium_path(), '--headless', '--no-sandbox', '--disable-gpu', '--remote-debugging-pipe',
                '--no-first-run', '--hide-scrollbars', f'--user-data-dir={self._profile}', 'about:blank']
        self.proc = subprocess.Popen(args, preexec_fn=wire, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome); os.close(from_chrome)
        self._buffer = b''

    def _recv(self, deadline: float) -> dict:
        while b'\0' not in self._buffer:
            if time.monotonic() > deadline: raise TimeoutError('Chromium did not answer')
            chunk = os.read(self._read, 1 << 16)
            if not chunk: raise RuntimeError('Chromium closed its DevTools pipe')
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b'\0', 1)
        return json.loads(message)

    def wait_event(self, method: str, session: str) -> dict:
        "The first event `method` of `session`, kept or still to come"
        deadline = time.monotonic() + self.timeout
        while True:
            for e in self._events:
                if e.get('method') == method and e.get('sessionId') == session: return e
            self._events.append(self._recv(deadline))

    def send(self, method: str, session: str | None = None, **params) -> dict:
        "One protocol command; its result (events met while waiting are kept for `events`)"
        self._id += 1
        msg = dict(id=self._id, method=method, params=params) | ({'sessionId': session} if session else {})
        os.write(self._write, json.dumps(msg).encode() + b'\0')
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if reply.get('id') != self._id: self._events.append(reply); continue
            if 'error' in reply: raise RuntimeError(f'{method}: {reply["error"]}')
            return reply['result']

    def open(self, url: str, width: int = 1400, height: int = 1800) -> 'Page':
        target = self.send('Target.createTarget', url='about:blank')['targetId']
        session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
        self.send('Network.enable', session)
        self.send('Page.enable', session)
        self.send('Emulation.setDeviceMetricsOverride', session, width=width, height=height, deviceScaleFactor=1,
                  mobile=False)
        self.send('Page.navigate', session, url=url)
        self.wait_event('Page.loadEventFired', session)
        page = Page(self, session)
        page.evaluate(SETTLED)
        page.requests = [e['params']['request']['url'] for e in self._events
                         if e.get('sessionId') == session and e.get('method') == 'Network.requestWillBeSent']
        page.failed = [e['params'] for e in self._events
                       if e.get('sessionId') == session and e.get('method') == 'Network.loadingFailed']
        return page

    def close(self):
        try: self.send('Browser.close')
        except (RuntimeError, TimeoutError, OSError): pass
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        os.close(self._read); os.close(self._write)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self): return self
    def __exit__(self, *exc): self.close()


SETTLED = '''(async () => {  // MathJax has typeset the page and each image has loaded or failed
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await Promise.all([...document.images].map(i => i.complete ? null : new Promise(r => i.onload = i.onerror = r)));
  return true;
})()'''


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session, self.requests, self.failed = browser, session, [], []

    def evaluate(self, js: str):
        "The value of `js` (a promise is awaited), as JSON gives it back"
        res = self.browser.send('Runtime.evaluate', self.session, expression=js, awaitPromise=True, returnByValue=True)
        if 'exceptionDetails' in res: raise RuntimeError(f'{js[:60]}...: {res["exceptionDetails"]}')
        return res['result'].get('value')

    def screenshot(self, path) -> int:
        "The visible part of the page as a PNG at `path`; its size in bytes"
        data = base64.b64decode(self.browser.send('Page.captureScreenshot', self.session, format='png')['data'])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return len(data)
