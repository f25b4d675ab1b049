//! The shape of `proxy/src`, checked: which module may use which (ARCHITECTURE.md,
//! "Layers"), no import circles between source files, and the size limits the code
//! keeps (files under 600 lines, structs under 16 fields).
//!
//! Both crates' sources are checked for circles and sizes (`proxy/src` and
//! `policies/src`), the layers only in `proxy/src`.
//!
//! Run alone with `cargo test -p spillway --test layers`; it reads the source files
//! and needs no server. A use is any path that starts with `crate::` or `super::`, or
//! with the name of a module the file declares (`mod x;` … `x::f()`); `#[cfg(test)]`
//! modules at the end of a file are not counted. A file's module uses what its paths
//! resolve to, by the longest known module prefix. A circle is one between siblings:
//! each use is lifted to the children of the two modules' lowest common ancestor
//! (`session::handler::held::replay` using `session::handler::tracker` is `held` using
//! `tracker`), and a module using its own parent or children is no circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers of `proxy/src`, top first: a module may use its own layer and the
/// layers below it, never one above.
const LAYERS: &[&[&str]] = &[
    &["ops"],
    &["session"],
    &["write"],
    &["read"],
    &["net"],
    &["error"],
    &["protocol", "config", "metrics"],
];

const MAX_FILE_LINES: usize = 600;
const MAX_STRUCT_FIELDS: usize = 15;

/// One source file: its module path (`session::handler` for
/// `session/handler/mod.rs`) and its text without trailing test modules.
struct Source {
    module: String,
    path: PathBuf,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The source folders checked for circles and sizes: this crate's and the policies
/// crate's.
fn src_dirs() -> [PathBuf; 2] {
    [
        src_dir(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/src"),
    ]
}

fn sources() -> Vec<Source> {
    sources_in(&src_dir())
}

fn sources_in(root: &Path) -> Vec<Source> {
    let root = root.to_path_buf();
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "main.rs"))
        .map(|path| {
            let rel = path.strip_prefix(&root).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("readable source");
            Source {
                module: parts.join("::"),
                path,
                text: strip_tests(&text),
            }
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text before the first `#[cfg(test)]` (test modules close the files here).
fn strip_tests(text: &str) -> String {
    match text.find("#[cfg(test)]") {
        Some(at) => text[..at].to_owned(),
        None => text.to_owned(),
    }
}

/// Lines that are not comments (doc comments name modules freely).
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter(|l| !l.trim_start().starts_with("//"))
}

/// The submodules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn declared_children(text: &str) -> Vec<String> {
    code_lines(text)
        .filter_map(|l| {
            let l = l.trim();
            let rest = l.strip_suffix(';')?;
            let name = rest.rsplit_once("mod ")?.1;
            let before = &rest[..rest.len() - name.len() - 4];
            (before.is_empty() || before.trim_end().starts_with("pub"))
                .then(|| name.trim().to_owned())
        })
        .collect()
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path in `line` that starts with one of `roots` (followed by `::`): its
/// segments, with `{a, b::c}` groups expanded to their first segments.
fn paths_from(line: &str, root: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let needle = format!("{root}::");
    let mut from = 0;
    while let Some(pos) = line[from..].find(&needle) {
        let at = from + pos;
        from = at + needle.len();
        if line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident_char(c) || c == ':')
        {
            continue;
        }
        let mut segments = vec![root.to_owned()];
        let rest = &line[from..];
        let mut chars = rest.char_indices().peekable();
        let mut current = String::new();
        let mut group = None;
        while let Some((i, c)) = chars.next() {
            if is_ident_char(c) {
                current.push(c);
            } else if c == ':' && rest[i..].starts_with("::") {
                chars.next();
                segments.push(std::mem::take(&mut current));
            } else if c == '{' && current.is_empty() {
                group = Some(i);
                break;
            } else {
                break;
            }
        }
        if !current.is_empty() {
            segments.push(current);
        }
        match group {
            None => found.push(segments),
            Some(open) => {
                let inner = &rest[open + 1..];
                let close = inner.find('}').unwrap_or(inner.len());
                for item in inner[..close].split(',') {
                    let first: String = item
                        .trim()
                        .chars()
                        .take_while(|c| is_ident_char(*c))
                        .collect();
                    if !first.is_empty() {
                        let mut s = segments.clone();
                        s.push(first);
                        found.push(s);
                    }
                }
            }
        }
    }
    found
}

/// The module a path refers to, from the file module `from` (the longest known
/// module prefix of the resolved path).
fn resolve(
    from: &str,
    segments: &[String],
    modules: &BTreeSet<String>,
    is_dir_module: bool,
) -> Option<String> {
    let mut base: Vec<&str> = if from.is_empty() {
        vec![]
    } else {
        from.split("::").collect()
    };
    let mut rest = segments;
    match segments.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &segments[1..];
        }
        Some("super") => {
            // `super` of a file module `a::b` (b.rs) is `a`; of `a::b` (b/mod.rs) also `a`.
            let _ = is_dir_module;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => {}
    }
    let mut full: Vec<&str> = base;
    full.extend(rest.iter().map(String::as_str));
    (0..=full.len())
        .rev()
        .map(|n| full[..n].join("::"))
        .find(|m| modules.contains(m))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

fn layer_of(module: &str) -> Option<usize> {
    let t = top(module);
    LAYERS.iter().position(|l| l.contains(&t))
}

/// Edges between file modules: (from, to) → the first line that makes it.
fn edges(sources: &[Source]) -> BTreeMap<(String, String), String> {
    let modules: BTreeSet<String> = sources.iter().map(|s| s.module.clone()).collect();
    let mut edges = BTreeMap::new();
    for s in sources {
        let is_dir = s.path.file_name().is_some_and(|n| n == "mod.rs");
        let children = declared_children(&s.text);
        for line in code_lines(&s.text) {
            let mut paths = paths_from(line, "crate");
            paths.extend(paths_from(line, "super"));
            for child in &children {
                for mut p in paths_from(line, child) {
                    p.insert(0, "self".to_owned());
                    paths.push(p);
                }
            }
            for p in paths {
                let resolved = if p[0] == "self" {
                    let mut full = s.module.clone();
                    for seg in &p[1..] {
                        if !full.is_empty() {
                            full.push_str("::");
                        }
                        full.push_str(seg);
                    }
                    (0..=full.split("::").count())
                        .rev()
                        .map(|n| full.split("::").take(n).collect::<Vec<_>>().join("::"))
                        .find(|m| modules.contains(m))
                } else {
                    resolve(&s.module, &p, &modules, is_dir)
                };
                if let Some(to) = resolved
                    && to != s.module
                    && !to.is_empty()
                {
                    edges
                        .entry((s.module.clone(), to))
                        .or_insert_with(|| line.trim().to_owned());
                }
            }
        }
    }
    edges
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(
    nodes: &BTreeSet<String>,
    edges: &BTreeMap<(String, String), String>,
) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        adj: BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.adj.get(v).cloned().unwrap_or_default() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut adj: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        adj.entry(from.as_str()).or_default().push(to.as_str());
    }
    let mut t = Tarjan {
        adj,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for n in nodes {
        if !t.index.contains_key(n.as_str()) {
            t.visit(n);
        }
    }
    t.out
}

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let sources = sources();
    let mut wrong = Vec::new();
    for ((from, to), line) in edges(&sources) {
        let (Some(lf), Some(lt)) = (layer_of(&from), layer_of(&to)) else {
            continue;
        };
        if lt < lf {
            wrong.push(format!("{from} uses {to}: {line}"));
        }
    }
    for s in &sources {
        assert!(
            s.module.is_empty() || layer_of(&s.module).is_some(),
            "{} is in no layer: add its folder to LAYERS",
            s.module
        );
    }
    assert!(
        wrong.is_empty(),
        "uses of a higher layer:\n{}",
        wrong.join("\n")
    );
}

/// An edge between two modules, lifted to the siblings it joins: the children of
/// their lowest common ancestor that contain each end. `None` when one end contains
/// the other (a module and its own submodules are one unit: `mod.rs` re-exports, a
/// submodule uses its parent's types).
fn lift(from: &str, to: &str) -> Option<(String, String)> {
    let a: Vec<&str> = from.split("::").collect();
    let b: Vec<&str> = to.split("::").collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common == a.len() || common == b.len() {
        return None;
    }
    Some((a[..=common].join("::"), b[..=common].join("::")))
}

#[test]
fn no_import_circles_between_modules() {
    let mut file_edges = BTreeMap::new();
    for (n, dir) in src_dirs().iter().enumerate() {
        // Policies' modules get a prefix of their own: one graph, two crates.
        for ((from, to), line) in edges(&sources_in(dir)) {
            let name = |m: String| if n == 0 { m } else { format!("policies::{m}") };
            file_edges.insert((name(from), name(to)), line);
        }
    }
    let mut lifted: BTreeMap<(String, String), String> = BTreeMap::new();
    for ((from, to), line) in &file_edges {
        if let Some(pair) = lift(from, to) {
            lifted
                .entry(pair)
                .or_insert_with(|| format!("{from} -> {to}: {line}"));
        }
    }
    let nodes: BTreeSet<String> = lifted
        .keys()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    let found = cycles(&nodes, &lifted);
    let described: Vec<String> = found
        .iter()
        .map(|scc| {
            let inside: Vec<String> = lifted
                .iter()
                .filter(|((f, t), _)| scc.contains(f) && scc.contains(t))
                .map(|(_, why)| format!("    {why}"))
                .collect();
            format!("{}\n{}", scc.join(" <-> "), inside.join("\n"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "import circles:\n{}",
        described.join("\n")
    );
}

#[test]
fn no_file_over_the_line_limit() {
    let mut files = Vec::new();
    for dir in src_dirs() {
        collect(&dir, &mut files);
    }
    let over: Vec<String> = files
        .iter()
        .filter_map(|p| {
            let n = std::fs::read_to_string(p)
                .expect("readable")
                .lines()
                .count();
            (n > MAX_FILE_LINES).then(|| format!("{}: {n} lines", p.display()))
        })
        .collect();
    assert!(
        over.is_empty(),
        "files over {MAX_FILE_LINES} lines:\n{}",
        over.join("\n")
    );
}

/// Named-field structs and their field counts, the largest first.
fn struct_sizes(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim();
        let decl = l
            .strip_prefix("pub struct ")
            .or_else(|| l.strip_prefix("pub(crate) struct "))
            .or_else(|| l.strip_prefix("pub(super) struct "))
            .or_else(|| l.strip_prefix("struct "));
        if let Some(rest) = decl
            && l.ends_with('{')
        {
            let name: String = rest.chars().take_while(|c| is_ident_char(*c)).collect();
            let mut depth = 1;
            let mut fields = 0;
            i += 1;
            while i < lines.len() && depth > 0 {
                let f = lines[i].trim();
                if depth == 1
                    && !f.starts_with("//")
                    && !f.starts_with('#')
                    && f.contains(':')
                    && !f.starts_with('}')
                {
                    let head = f.split(':').next().unwrap_or("");
                    let ident = head
                        .trim_start_matches("pub(crate) ")
                        .trim_start_matches("pub(super) ")
                        .trim_start_matches("pub ");
                    if !ident.is_empty() && ident.chars().all(is_ident_char) {
                        fields += 1;
                    }
                }
                depth += f.matches('{').count();
                depth -= f.matches('}').count().min(depth);
                i += 1;
            }
            out.push((name, fields));
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn no_struct_over_the_field_limit() {
    let root = src_dir().join("../..");
    let mut files = Vec::new();
    for dir in src_dirs() {
        collect(&dir, &mut files);
    }
    let mut all: Vec<(usize, String)> = Vec::new();
    for p in &files {
        let text = std::fs::read_to_string(p).expect("readable");
        for (name, n) in struct_sizes(&text) {
            all.push((
                n,
                format!("{}::{name}", p.strip_prefix(&root).unwrap_or(p).display()),
            ));
        }
    }
    all.sort();
    if let Some((n, name)) = all.last() {
        println!("largest struct: {name}, {n} fields");
    }
    let over: Vec<String> = all
        .iter()
        .filter(|(n, _)| *n > MAX_STRUCT_FIELDS)
        .map(|(n, name)| format!("{name}: {n} fields"))
        .collect();
    assert!(
        over.is_empty(),
        "structs over {MAX_STRUCT_FIELDS} fields:\n{}",
        over.join("\n")
    );
}

#[test]
fn the_parser_reads_groups_and_nested_paths() {
    assert_eq!(
        paths_from("use crate::{net::conn::Conn, read};", "crate"),
        vec![vec!["crate", "net"], vec!["crate", "read"]]
    );
    assert_eq!(
        paths_from("let x = super::super::tracker::Expect::Ready;", "super"),
        vec![vec!["super", "super", "tracker", "Expect", "Ready"]]
    );
    assert!(paths_from("my_crate::x", "crate").is_empty());
    let modules: BTreeSet<String> = ["session", "session::handler", "session::handler::tracker"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let p: Vec<String> = ["super", "tracker", "Expect"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(
        resolve("session::handler::held", &p, &modules, true).as_deref(),
        Some("session::handler::tracker")
    );
    assert_eq!(
        lift(
            "session::handler::held::replay",
            "session::handler::tracker"
        ),
        Some((
            "session::handler::held".to_owned(),
            "session::handler::tracker".to_owned()
        ))
    );
    assert_eq!(lift("config::load", "config"), None);
    assert_eq!(
        lift("ops::admin", "session::startup"),
        Some(("ops".to_owned(), "session".to_owned()))
    );
    assert_eq!(
        struct_sizes("pub struct A {\n    a: u8,\n    pub b: Vec<u8>,\n    // c: no\n}\n"),
        vec![("A".to_owned(), 2)]
    );
}
