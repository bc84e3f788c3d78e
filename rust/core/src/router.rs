//! Topic → targets. Exact topics are one hash lookup; NATS (`*`, `>`) and MQTT (`+`, `#`)
//! wildcard patterns are indexed by their first literal token so an exact lookup does not scan
//! every pattern. A rebuilt [`RouteTable`] is swapped in atomically: readers never block and
//! never see a half-built table.

use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;

/// One token of a wildcard pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*` (NATS) or `+` (MQTT): exactly one token.
    One,
    /// `>` (NATS): one or more remaining tokens.
    OneOrMore,
    /// `#` (MQTT): zero or more remaining tokens.
    ZeroOrMore,
}

/// A compiled subscription pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    separator: char,
    tokens: Vec<Token>,
}

impl Pattern {
    /// Compiles `topic` when it contains wildcards; `None` for an exact topic.
    ///
    /// MQTT patterns (`+`, `#`) use `/` as separator, NATS patterns (`*`, `>`) use `.`; a
    /// wildcard character inside a longer token (`orders*`) is a literal, as in both protocols.
    pub fn compile(topic: &str) -> Option<Pattern> {
        let mqtt = topic.split('/').any(|t| t == "+" || t == "#");
        let nats = topic.split('.').any(|t| t == "*" || t == ">");
        if !mqtt && !nats {
            return None;
        }
        let separator = if mqtt { '/' } else { '.' };
        let parts: Vec<&str> = topic.split(separator).collect();
        let last = parts.len() - 1;
        let tokens = parts
            .iter()
            .enumerate()
            .map(|(i, part)| match (*part, mqtt) {
                ("+", true) | ("*", false) => Token::One,
                // A tail wildcard only means "the rest" in the last position.
                ("#", true) if i == last => Token::ZeroOrMore,
                (">", false) if i == last => Token::OneOrMore,
                (lit, _) => Token::Literal(lit.to_owned()),
            })
            .collect();
        Some(Pattern { separator, tokens })
    }

    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split(self.separator);
        for token in &self.tokens {
            match token {
                Token::ZeroOrMore => return true,
                Token::OneOrMore => return parts.next().is_some(),
                Token::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    fn first_literal(&self) -> Option<&str> {
        match self.tokens.first() {
            Some(Token::Literal(lit)) => Some(lit),
            _ => None,
        }
    }

    fn separator(&self) -> char {
        self.separator
    }
}

/// An immutable routing table from topics to target indexes (`T` is the engine's target).
#[derive(Debug)]
pub struct RouteTable<T> {
    targets: Vec<T>,
    exact: HashMap<String, Vec<usize>>,
    /// Patterns whose first token is a literal, keyed by that literal; one map per separator
    /// (`.` then `/`) so a lookup borrows the topic's first token without allocating.
    by_first: [HashMap<String, Vec<(Pattern, usize)>>; 2],
    /// Patterns that start with a wildcard: checked for every topic.
    leading_wild: Vec<(Pattern, usize)>,
    /// Target indexes by name (tables built with [`RouteTable::build_named`]).
    by_name: HashMap<String, Vec<usize>>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            targets: Vec::new(),
            exact: HashMap::new(),
            by_first: [HashMap::new(), HashMap::new()],
            leading_wild: Vec::new(),
            by_name: HashMap::new(),
        }
    }
}

impl<T> RouteTable<T> {
    /// Builds a table from `(target, topics)` pairs.
    pub fn build<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = (T, Vec<S>)>,
        S: AsRef<str>,
    {
        let mut table = RouteTable::default();
        for (target, topics) in entries {
            let index = table.targets.len();
            table.targets.push(target);
            for topic in topics {
                let topic = topic.as_ref();
                match Pattern::compile(topic) {
                    None => table.exact.entry(topic.to_owned()).or_default().push(index),
                    Some(pattern) => match pattern.first_literal() {
                        Some(first) => {
                            let slot = usize::from(pattern.separator() == '/');
                            let first = first.to_owned();
                            table.by_first[slot]
                                .entry(first)
                                .or_default()
                                .push((pattern, index));
                        }
                        None => table.leading_wild.push((pattern, index)),
                    },
                }
            }
        }
        table
    }

    /// [`RouteTable::build`] plus an index of the targets by `name`, for
    /// [`RouteTable::lookup_named`].
    pub fn build_named<I, S>(entries: I, name: impl Fn(&T) -> &str) -> Self
    where
        I: IntoIterator<Item = (T, Vec<S>)>,
        S: AsRef<str>,
    {
        let mut table = Self::build(entries);
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, target) in table.targets.iter().enumerate() {
            by_name
                .entry(name(target).to_owned())
                .or_default()
                .push(index);
        }
        table.by_name = by_name;
        table
    }

    /// The targets named `name` that subscribe to `topic`: what `lookup(topic)` filtered by
    /// name gives, without collecting every subscriber of the topic. A message addressed to one
    /// function of a topic many functions subscribe to (a cron fire: every scheduled function
    /// subscribes to `cron-function`) costs one check instead of one per subscriber.
    /// Empty for a table built without names.
    pub fn lookup_named(&self, topic: &str, name: &str) -> Vec<&T> {
        let Some(indexes) = self.by_name.get(name) else {
            return Vec::new();
        };
        indexes
            .iter()
            .filter(|&&index| self.subscribes(index, topic))
            .filter_map(|&index| self.targets.get(index))
            .collect()
    }

    /// Whether target `index` subscribes to `topic` (exactly or through a pattern).
    fn subscribes(&self, index: usize, topic: &str) -> bool {
        // Exact lists are built in index order: sorted.
        if self
            .exact
            .get(topic)
            .is_some_and(|list| list.binary_search(&index).is_ok())
        {
            return true;
        }
        let pattern_hit =
            |list: &[(Pattern, usize)]| list.iter().any(|(p, i)| *i == index && p.matches(topic));
        for (separator, by_first) in ['.', '/'].into_iter().zip(&self.by_first) {
            let first = topic.split(separator).next().unwrap_or(topic);
            if by_first.get(first).is_some_and(|list| pattern_hit(list)) {
                return true;
            }
        }
        pattern_hit(&self.leading_wild)
    }

    pub fn targets(&self) -> &[T] {
        &self.targets
    }

    /// Every target subscribed to `topic`, each once, in table order.
    pub fn lookup(&self, topic: &str) -> Vec<&T> {
        let mut hits: Vec<usize> = self.exact.get(topic).cloned().unwrap_or_default();
        for (separator, by_first) in ['.', '/'].into_iter().zip(&self.by_first) {
            let first = topic.split(separator).next().unwrap_or(topic);
            if let Some(patterns) = by_first.get(first) {
                hits.extend(
                    patterns
                        .iter()
                        .filter(|(p, _)| p.matches(topic))
                        .map(|(_, i)| *i),
                );
            }
        }
        hits.extend(
            self.leading_wild
                .iter()
                .filter(|(p, _)| p.matches(topic))
                .map(|(_, i)| *i),
        );
        if hits.len() > 1 {
            // A function subscribed through two matching patterns still gets the message once.
            hits.sort_unstable();
            hits.dedup();
        }
        hits.into_iter()
            .filter_map(|i| self.targets.get(i))
            .collect()
    }

    /// Whether any target subscribes to anything at all.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The distinct subscribed topics and patterns, for sources that subscribe per topic.
    pub fn len(&self) -> usize {
        self.targets.len()
    }
}

/// The live table behind an atomic pointer swap.
pub struct Router<T> {
    table: ArcSwap<RouteTable<T>>,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            table: ArcSwap::from_pointee(RouteTable::default()),
        }
    }
}

impl<T> Router<T> {
    /// A snapshot that stays valid (and unchanged) while the caller uses it.
    pub fn snapshot(&self) -> Arc<RouteTable<T>> {
        self.table.load_full()
    }

    pub fn swap(&self, table: RouteTable<T>) {
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names<'a>(table: &'a RouteTable<&'static str>, topic: &str) -> Vec<&'a str> {
        table.lookup(topic).into_iter().copied().collect()
    }

    #[test]
    fn lookup_named_is_lookup_filtered_by_name() {
        let table = RouteTable::build_named(
            vec![
                ("a", vec!["cron-function", "orders.*"]),
                ("b", vec!["cron-function"]),
                ("c", vec!["*.created"]),
                ("a", vec!["sensors/#"]),
            ],
            |t| t,
        );
        for topic in [
            "cron-function",
            "orders.created",
            "sensors/x/y",
            "users.created",
            "none",
        ] {
            for name in ["a", "b", "c", "zz"] {
                let filtered: Vec<&str> = names(&table, topic)
                    .into_iter()
                    .filter(|t| *t == name)
                    .collect();
                let named: Vec<&str> = table
                    .lookup_named(topic, name)
                    .into_iter()
                    .copied()
                    .collect();
                assert_eq!(named, filtered, "topic {topic} name {name}");
            }
        }
        assert_eq!(table.lookup_named("cron-function", "b"), vec![&"b"]);
        let unnamed = RouteTable::build(vec![("a", vec!["t"])]);
        assert!(unnamed.lookup_named("t", "a").is_empty());
    }

    #[test]
    fn nats_wildcards() {
        let p = Pattern::compile("orders.*").expect("pattern");
        assert!(p.matches("orders.created"));
        assert!(!p.matches("orders"));
        assert!(!p.matches("orders.created.eu"));
        let p = Pattern::compile("orders.>").expect("pattern");
        assert!(p.matches("orders.created"));
        assert!(p.matches("orders.created.eu"));
        assert!(!p.matches("orders"));
        let p = Pattern::compile("*.created").expect("pattern");
        assert!(p.matches("orders.created"));
        assert!(!p.matches("orders.deleted"));
        assert!(Pattern::compile("orders*").is_none());
        assert!(Pattern::compile("orders.created").is_none());
    }

    #[test]
    fn mqtt_wildcards() {
        let p = Pattern::compile("sensors/+/temp").expect("pattern");
        assert!(p.matches("sensors/kitchen/temp"));
        assert!(!p.matches("sensors/kitchen/humidity"));
        assert!(!p.matches("sensors/a/b/temp"));
        let p = Pattern::compile("sensors/#").expect("pattern");
        assert!(p.matches("sensors"));
        assert!(p.matches("sensors/a/b/c"));
        assert!(!p.matches("actuators/a"));
        let p = Pattern::compile("#").expect("pattern");
        assert!(p.matches("anything/at/all"));
    }

    #[test]
    fn a_tail_wildcard_in_the_middle_is_a_literal() {
        let p = Pattern::compile("a.>.c").expect("pattern has a * or > token");
        assert!(p.matches("a.>.c"));
        assert!(!p.matches("a.b.c"));
    }

    #[test]
    fn fan_out_and_dedup() {
        let table = RouteTable::build(vec![
            ("exact", vec!["orders.created"]),
            ("star", vec!["orders.*"]),
            ("both", vec!["orders.*", "orders.>"]),
            ("other", vec!["payments.*"]),
            ("lead", vec!["*.created"]),
        ]);
        assert_eq!(
            names(&table, "orders.created"),
            vec!["exact", "star", "both", "lead"]
        );
        assert_eq!(names(&table, "orders.created.eu"), vec!["both"]);
        assert_eq!(names(&table, "payments.refunded"), vec!["other"]);
        assert!(names(&table, "nothing").is_empty());
    }

    #[test]
    fn swap_under_concurrent_lookups_never_shows_a_partial_table() {
        // Each table maps every one of its 200 topics to exactly the same generation number;
        // a reader that saw a half-built table would see a missing topic or mixed generations.
        let router: Arc<Router<u64>> = Arc::new(Router::default());
        let build = |generation: u64| {
            RouteTable::build((0..200).map(|i| (generation, vec![format!("t.{i}")])))
        };
        router.swap(build(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let router = Arc::clone(&router);
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut checks = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let table = router.snapshot();
                        let first = *table.lookup("t.0")[0];
                        for i in 0..200 {
                            let hit = table.lookup(&format!("t.{i}"));
                            assert_eq!(hit.len(), 1, "topic t.{i} missing");
                            assert_eq!(*hit[0], first, "mixed generations");
                        }
                        checks += 1;
                    }
                    checks
                })
            })
            .collect();
        for generation in 1..200 {
            router.swap(build(generation));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().expect("reader panicked") > 0);
        }
    }

    #[test]
    fn exact_lookup_with_10k_functions_is_well_under_a_microsecond() {
        // Not a timing assertion (the machine is shared): prints the figure for the notes and
        // checks the lookup returns the right function among 10k exact and 1k pattern entries.
        let mut entries: Vec<(usize, Vec<String>)> = (0..10_000)
            .map(|i| (i, vec![format!("topic.{i}")]))
            .collect();
        entries.extend((0..1_000).map(|i| (10_000 + i, vec![format!("pat{i}.*")])));
        let table = RouteTable::build(entries);
        let n = 200_000;
        let start = std::time::Instant::now();
        let mut found = 0usize;
        for i in 0..n {
            found += table.lookup(&format!("topic.{}", i % 10_000)).len();
        }
        let per = start.elapsed() / n;
        assert_eq!(found, n as usize);
        eprintln!("exact lookup with 10k functions: {per:?} per lookup (including format!)");
    }
}
