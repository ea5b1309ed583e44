//! `gen-users`: the `PUT /admin/users` body for N benchmark users (normal users with generous
//! per-family limits, as an operator with quotas would have).

use std::io::Write;

use crate::args::{user_token, Args};

pub fn gen_users(a: &Args) -> Result<(), String> {
    let count: u64 = a.get("count", 10_000)?;
    let seed = u32::from_str_radix(a.req("token-seed")?, 16).map_err(|_| "--token-seed is hex")?;
    let created: u64 = 1_763_000_000_000;
    let mut out = String::with_capacity(count as usize * 220 + 16);
    out.push_str("{\"users\":[");
    for i in 0..count {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"token\":\"{}\",\"type\":\"normal\",\"nickname\":\"bench-{i}\",\"ip\":[],\"promptCount\":0,\"tokenCounts\":{{}},\"tokenLimits\":{{\"turbo\":1000000000,\"gpt4\":1000000000,\"gpt4o\":1000000000,\"gpt4-turbo\":1000000000,\"claude\":1000000000}},\"createdAt\":{}}}",
            user_token(seed, i),
            created + i
        ));
    }
    out.push_str("]}\n");
    match a.str("out") {
        Some(path) => std::fs::write(path, out).map_err(|e| format!("{path}: {e}")),
        None => std::io::stdout()
            .write_all(out.as_bytes())
            .map_err(|e| e.to_string()),
    }
}
