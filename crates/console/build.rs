//! Embeds the console's assets: every file under `assets/`, plus noVNC's ES
//! modules from `node_modules/@novnc/novnc` (installed by `npm ci` in this
//! directory; `scripts/test` and `scripts/demo` run it). Generates
//! `$OUT_DIR/assets.rs`: a table of (URL path, content, ETag) whose contents
//! are `include_bytes!` of the original files, so that a change to any of
//! them rebuilds the crate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.flatten().map(|e| e.path()).collect(),
        Err(e) => panic!("reading {}: {e}", dir.display()),
    };
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// FNV-1a, 64 bits: a cheap content hash for ETags.
fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let assets = root.join("assets");
    let novnc = root.join("node_modules/@novnc/novnc");
    println!("cargo:rerun-if-changed=assets");
    println!("cargo:rerun-if-changed=package-lock.json");
    println!("cargo:rerun-if-changed=node_modules/@novnc/novnc/package.json");

    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut list = Vec::new();
    walk(&assets, &mut list);
    for p in list {
        let rel = p
            .strip_prefix(&assets)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if rel.ends_with(".swp") || rel.starts_with('.') || rel.contains("/.") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", p.display());
        files.push((format!("/ui/{rel}"), p));
    }

    if !novnc.join("core/rfb.js").is_file() {
        panic!(
            "\n\nnoVNC is missing: {} does not exist.\n\
             The browser console vendors noVNC (npm @novnc/novnc) at build time.\n\
             Run `npm ci` in {} (scripts/test and scripts/demo do it), then build again.\n\n",
            novnc.join("core/rfb.js").display(),
            root.display()
        );
    }
    for sub in ["core", "vendor"] {
        let mut list = Vec::new();
        walk(&novnc.join(sub), &mut list);
        for p in list {
            let rel = p
                .strip_prefix(&novnc)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            if !(rel.ends_with(".js") || rel.ends_with("LICENSE")) {
                continue;
            }
            files.push((format!("/ui/novnc/{rel}"), p));
        }
    }
    files.push(("/ui/novnc/LICENSE.txt".into(), novnc.join("LICENSE.txt")));

    let mut code = String::from(
        "/// Embedded assets: (URL path, content, ETag).\n\
         pub static ASSETS: &[(&str, &[u8], &str)] = &[\n",
    );
    for (url, path) in &files {
        let data =
            std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        writeln!(
            code,
            "    ({url:?}, include_bytes!({:?}), \"\\\"{:016x}\\\"\"),",
            path.display().to_string(),
            fnv(&data)
        )
        .unwrap();
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("assets.rs");
    std::fs::write(out, code).unwrap();
}
