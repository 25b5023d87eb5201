//! Direction: [`Dir`] (the kernel ABI's own type, re-exported) and [`PerDir`], one value
//! per direction, indexed by `Dir`. Everything that exists once per direction (a policy's
//! rate and line, a plan's class tree, a controller's rate) is a `PerDir`, not a pair of
//! `upload_*`/`download_*` fields. A leaf.

use std::ops::{Index, IndexMut};

use serde::{Deserialize, Serialize};

pub use shaper_common::Dir;

/// One `T` per direction: `[upload, download]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PerDir<T>(pub [T; 2]);

impl<T> PerDir<T> {
    pub const fn new(up: T, down: T) -> Self {
        PerDir([up, down])
    }

    /// Builds each direction's value from the direction.
    pub fn from_fn(mut f: impl FnMut(Dir) -> T) -> Self {
        PerDir([f(Dir::Up), f(Dir::Down)])
    }

    /// Each direction with its value, upload first.
    pub fn iter(&self) -> impl Iterator<Item = (Dir, &T)> {
        Dir::ALL.into_iter().zip(self.0.iter())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Dir, &mut T)> {
        Dir::ALL.into_iter().zip(self.0.iter_mut())
    }

    /// Each direction's value through `f`.
    pub fn map<U>(self, mut f: impl FnMut(Dir, T) -> U) -> PerDir<U> {
        let [up, down] = self.0;
        PerDir([f(Dir::Up, up), f(Dir::Down, down)])
    }

    pub fn as_ref(&self) -> PerDir<&T> {
        PerDir([&self.0[0], &self.0[1]])
    }

    /// Both values, upload first.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

/// Accepts a `Result` per direction; the first error wins.
impl<T, E> PerDir<Result<T, E>> {
    pub fn transpose(self) -> Result<PerDir<T>, E> {
        let [up, down] = self.0;
        Ok(PerDir([up?, down?]))
    }
}

impl<T> Index<Dir> for PerDir<T> {
    type Output = T;
    fn index(&self, d: Dir) -> &T {
        &self.0[d.index()]
    }
}

impl<T> IndexMut<Dir> for PerDir<T> {
    fn index_mut(&mut self, d: Dir) -> &mut T {
        &mut self.0[d.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_by_direction_and_matches_the_abi() {
        let mut p = PerDir::new("up", "down");
        assert_eq!(p[Dir::Up], "up");
        assert_eq!(p[Dir::Down], "down");
        p[Dir::Down] = "d";
        assert_eq!(p.0, ["up", "d"]);
        assert_eq!(Dir::Up as u32, shaper_common::DIR_UP);
        assert_eq!(Dir::Down as u32, shaper_common::DIR_DOWN);
        assert_eq!(Dir::from_u32(1), Some(Dir::Down));
        assert_eq!(Dir::from_u32(2), None);
        let names: Vec<_> = p.map(|d, _| d.name()).0.into();
        assert_eq!(names, ["upload", "download"]);
        assert_eq!(
            serde_json::to_string(&Dir::Down).unwrap(),
            "\"down\"",
            "state files and JSON output name it so"
        );
    }
}
