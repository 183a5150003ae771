//! Where the kernels write: straight into the product's rows, each task
//! into its own window.
//!
//! Each parallel task computes a block of weight rows for a run of
//! activation rows: a window of the `[n, rows]` product whose rows are
//! strided through it, so the windows of two tasks interleave in memory.
//! Safe Rust can hand them out only as separate buffers, copied into the
//! product afterwards: at 32 rows a decode step allocated, zeroed and
//! copied about 26 MB that way (4% of its profile on Zen 4). The windows
//! are disjoint by construction; this module is the one place that relies
//! on it.

use std::marker::PhantomData;

/// The whole product, shared by the tasks that fill its windows.
pub struct Product<'a> {
    ptr: *mut f32,
    rows: usize,
    n: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: tasks write only through windows, which never overlap
// (`Product::window`'s contract).
unsafe impl Sync for Product<'_> {}

impl<'a> Product<'a> {
    /// `out` as `n` rows of `rows` products each.
    pub fn new(out: &'a mut [f32], rows: usize, n: usize) -> Self {
        assert_eq!(out.len(), rows * n, "the product is n x rows");
        Self { ptr: out.as_mut_ptr(), rows, n, _out: PhantomData }
    }

    /// Activation rows `i0..i1` by weight rows `r0..r1`.
    ///
    /// # Safety
    /// No two windows in use at the same time may overlap.
    pub unsafe fn window(&self, (i0, i1): (usize, usize), (r0, r1): (usize, usize)) -> Window<'_> {
        assert!(i0 <= i1 && i1 <= self.n && r0 <= r1 && r1 <= self.rows, "a window lies within the product");
        // SAFETY: the offset is within the product (asserted).
        let ptr = unsafe { self.ptr.add(i0 * self.rows + r0) };
        Window { ptr, stride: self.rows, width: r1 - r0, n: i1 - i0, _out: PhantomData }
    }
}

/// One task's part of the product.
pub struct Window<'a> {
    ptr: *mut f32,
    stride: usize,
    width: usize,
    n: usize,
    _out: PhantomData<&'a mut [f32]>,
}

impl Window<'_> {
    /// Sets the product of the window's weight row `r` and activation row `i`.
    #[inline]
    pub fn set(&mut self, i: usize, r: usize, v: f32) {
        assert!(i < self.n && r < self.width, "({i}, {r}) lies outside the {} x {} window", self.n, self.width);
        // SAFETY: within the window (asserted), which lies within the
        // product and overlaps no other window in use.
        unsafe { self.ptr.add(i * self.stride + r).write(v) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_write_their_own_rows_and_columns() {
        let mut out = vec![0f32; 3 * 4];
        let product = Product::new(&mut out, 4, 3);
        // SAFETY: the two windows are disjoint.
        let (mut a, mut b) = unsafe { (product.window((0, 3), (0, 2)), product.window((1, 3), (2, 4))) };
        a.set(2, 1, 1.0);
        b.set(0, 0, 2.0);
        b.set(1, 1, 3.0);
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 3.0]);
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn a_write_outside_the_window_panics() {
        let mut out = vec![0f32; 4];
        let product = Product::new(&mut out, 2, 2);
        // SAFETY: the only window.
        unsafe { product.window((0, 1), (0, 2)) }.set(1, 0, 1.0);
    }
}
