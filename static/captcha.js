// The proof-of-work solver of /user/captcha (llm-gatekeeper). It asks the server for a signed
// challenge, searches for a solution whose Argon2id hash (hash-wasm's `argon2id`, served at
// /user/captcha/argon2.js) is at most the challenge's target, then sends it and shows the
// token the server issues. No third-party requests.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const status = (text) => { $("status").textContent = text; };

  function hexToBytes(hex) {
    const out = new Uint8Array(hex.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(i * 2, 2), 16);
    return out;
  }

  // Big-endian comparison of two equally long byte arrays: a <= b.
  function atMost(a, b) {
    for (let i = 0; i < a.length; i++) {
      if (a[i] !== b[i]) return a[i] < b[i];
    }
    return true;
  }

  async function post(path, body) {
    const resp = await fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(data.error || ("HTTP " + resp.status));
    return data;
  }

  async function run() {
    $("start").disabled = true;
    $("result").hidden = true;
    const keyInput = $("proxyKey");
    const proxyKey = keyInput ? keyInput.value : undefined;
    const refreshToken = $("refreshToken").value.trim();
    try {
      status("Requesting a challenge…");
      const req = refreshToken
        ? { action: "refresh", refreshToken, proxyKey }
        : { action: "new", proxyKey };
      const { challenge, signature } = await post("/user/captcha/challenge", req);
      const salt = hexToBytes(challenge.s);
      const target = hexToBytes(challenge.d);
      status("Solving… keep this tab open.");
      const started = Date.now();
      let nonce = Math.floor(Math.random() * 1e9);
      for (let tries = 1; ; tries++, nonce++) {
        if (Date.now() > challenge.e) throw new Error("The challenge expired; press Start again.");
        const solution = String(nonce);
        const hash = await hashwasm.argon2id({
          password: solution,
          salt,
          parallelism: challenge.p,
          iterations: challenge.t,
          memorySize: challenge.m,
          hashLength: challenge.hl,
          outputType: "binary",
        });
        if (tries % 10 === 0) {
          const secs = Math.max(1, Math.round((Date.now() - started) / 1000));
          $("progress").textContent = tries + " hashes in " + secs + " s";
        }
        if (atMost(hash, target)) {
          status("Found a solution; verifying…");
          const res = await post("/user/captcha/verify", { challenge, signature, solution, proxyKey });
          $("token").value = res.token;
          $("result").hidden = false;
          status(refreshToken ? "Your token was refreshed." : "Here is your token.");
          return;
        }
      }
    } catch (e) {
      status("Failed: " + e.message);
    } finally {
      $("start").disabled = false;
    }
  }

  $("start").addEventListener("click", run);
})();
