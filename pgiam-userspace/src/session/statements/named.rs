//! A session's named objects (prepared statements, portals) by name, held in room of their own
//! only once the session has named one: most sessions never do, and every idle session would
//! otherwise carry an empty table's 48 bytes for each.

use std::collections::HashMap;

// Boxed on purpose: the empty table is the 48 bytes this saves.
#[allow(clippy::box_collection)]
pub struct Named<V>(Option<Box<HashMap<Vec<u8>, V>>>);

impl<V> Default for Named<V> {
    fn default() -> Self {
        Named(None)
    }
}

impl<V> Named<V> {
    pub fn get(&self, name: &[u8]) -> Option<&V> {
        self.0.as_ref()?.get(name)
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    pub fn insert(&mut self, name: Vec<u8>, value: V) -> Option<V> {
        self.0.get_or_insert_with(Box::default).insert(name, value)
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<V> {
        self.0.as_mut()?.remove(name)
    }

    pub fn retain(&mut self, keep: impl FnMut(&Vec<u8>, &mut V) -> bool) {
        if let Some(map) = &mut self.0 {
            map.retain(keep);
        }
    }

    /// Forgets them all, and gives their room back.
    pub fn clear(&mut self) {
        self.0 = None;
    }
}

#[cfg(test)]
mod tests {
    use super::Named;

    #[test]
    fn names_are_kept_until_removed_or_cleared() {
        let mut n = Named::default();
        assert!(n.get(b"s").is_none());
        assert_eq!(n.insert(b"s".to_vec(), 1), None);
        assert_eq!(n.insert(b"t".to_vec(), 2), None);
        assert_eq!(n.insert(b"s".to_vec(), 3), Some(1));
        assert_eq!(n.get(b"s"), Some(&3));
        n.retain(|k, _| k != b"t");
        assert!(!n.contains_key(b"t"));
        assert_eq!(n.remove(b"s"), Some(3));
        n.insert(b"u".to_vec(), 4);
        n.clear();
        assert!(n.get(b"u").is_none());
        assert_eq!(std::mem::size_of::<Named<u64>>(), 8);
    }
}
