//! Kubernetes resource quantities ("250m", "1Gi", "1e3") reduced to what placement needs.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Parse a quantity into a plain number (cores for cpu, bytes for memory).
pub fn parse_quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => 10f64.powi(e[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// The resources placement checks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub cpu: f64,
    pub memory: f64,
    pub ephemeral_storage: f64,
    pub pods: f64,
}

impl Resources {
    pub fn from_list(list: &BTreeMap<String, Quantity>) -> Self {
        let get = |k: &str| list.get(k).and_then(|q| parse_quantity(&q.0)).unwrap_or(0.0);
        Resources {
            cpu: get("cpu"),
            memory: get("memory"),
            ephemeral_storage: get("ephemeral-storage"),
            pods: get("pods"),
        }
    }

    pub fn add(&mut self, o: &Resources) {
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.ephemeral_storage += o.ephemeral_storage;
        self.pods += o.pods;
    }

    pub fn max_with(&mut self, o: &Resources) {
        self.cpu = self.cpu.max(o.cpu);
        self.memory = self.memory.max(o.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(o.ephemeral_storage);
    }

    /// Err(resource) when `self` exceeds `allocatable` in a resource the node declares.
    pub fn fits_in(&self, allocatable: &Resources) -> Result<(), &'static str> {
        let checks = [
            ("cpu", self.cpu, allocatable.cpu),
            ("memory", self.memory, allocatable.memory),
            (
                "ephemeral-storage",
                self.ephemeral_storage,
                allocatable.ephemeral_storage,
            ),
            ("pods", self.pods, allocatable.pods),
        ];
        for (name, want, have) in checks {
            // A node that does not declare a resource is not limited by it.
            if have > 0.0 && want > have + 1e-9 {
                return Err(name);
            }
        }
        Ok(())
    }

    /// Load after placement: the larger of the cpu and memory fractions.
    pub fn load(&self, allocatable: &Resources) -> f64 {
        let frac = |used: f64, have: f64| if have > 0.0 { used / have } else { 0.0 };
        // Pod count too: pods without requests (most of them) would otherwise weigh nothing,
        // and a burst of migrations would all land on the first node by name.
        frac(self.cpu, allocatable.cpu)
            .max(frac(self.memory, allocatable.memory))
            .max(frac(self.pods, allocatable.pods))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("250m"), Some(0.25));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1Gi"), Some(1073741824.0));
        assert_eq!(parse_quantity("128974848"), Some(128974848.0));
        assert_eq!(parse_quantity("129e6"), Some(129e6));
        assert_eq!(parse_quantity("123Mi"), Some(123.0 * 1048576.0));
        assert_eq!(parse_quantity("1.5k"), Some(1500.0));
        assert_eq!(parse_quantity("abc"), None);
        assert_eq!(parse_quantity("1Qi"), None);
    }
}
